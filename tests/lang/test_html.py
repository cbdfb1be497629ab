"""ProgramState._repr_html_: roles, generated spans, token heat maps, select scores, totals, table, escaping."""

from __future__ import annotations

import math
import re
from html import unescape

import pytest

import plait as pl
import plait.lang.html as view
from plait.lang import MockBackend
from plait.lang.records import CallRecord


def test_html_shows_roles_generated_spans_and_calls():
    backend = MockBackend({"capital": " Paris <b>bold</b>"}, choice_logprobs={"yes": [-0.1], "no": [-2.0]})

    @pl.function
    def prog(s):
        s += pl.system("<script>alert('x')</script>")
        s += pl.user("What is the capital of France?")
        s += pl.assistant(pl.gen("answer", max_tokens=8))
        s += pl.user("Sure?")
        s += pl.assistant(pl.select("sure", choices=["yes", "no"]))

    html = prog.run(backend=backend)._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert '<span class="plait-gen" title="gen answer"> Paris &lt;b&gt;bold&lt;/b&gt;</span>' in html
    assert '<span class="plait-select" title="select sure">yes</span>' in html
    assert [m for m in re.findall(r'class="plait-role">(\w+)<', html)] == ["system", "user", "assistant", "user", "assistant"]
    assert '<span class="plait-tpl">&lt;|im_start|&gt;user\n</span>' in html
    rows = re.findall(r"<tr><td>(\w+)</td><td>(\w+)</td><td>(\d+)</td><td>(\d+)</td><td>(\d+)</td><td>([\d.]+) ms</td>", html)
    assert [(r[0], r[1]) for r in rows] == [("gen", "answer"), ("select", "sure")]
    assert int(rows[0][2]) > 0 and int(rows[0][4]) == 2  # prompt tokens; 2 generated (mock) tokens
    assert int(rows[1][3]) > 0  # the select's prefix was cached by the earlier call
    assert 'class="plait-tok"' not in html and "token probability" not in html  # no logprobs asked: no heat map


def test_streamed_generation_is_one_span_and_errors_show():
    backend = MockBackend({"Count": " one two three"})
    state = pl.function(lambda s: s.__iadd__("Count:" + pl.gen("c", max_tokens=3))).run(backend=backend, stream=True)
    list(state.text_iter())
    html = state._repr_html_()
    assert html.count('class="plait-gen"') == 1 and " one two three</span>" in html

    failing = pl.function(lambda s: s.__iadd__("x" + pl.select("c", choices=["a<"])))
    state = failing.run(backend=MockBackend(supports_select=False), stream=True)
    with pytest.raises(pl.lang.BackendCapabilityError):
        list(state.text_iter())
    assert "error: BackendCapabilityError" in state._repr_html_()


def token_spans(html: str) -> list[tuple[str, str, str]]:
    """(background, title, text) of every heat-map token span, unescaped."""
    found = re.findall(r'<span class="plait-tok" style="background:([^"]*)" title="([^"]*)">([^<]*)</span>', html)
    return [(bg, unescape(title), unescape(text)) for bg, title, text in found]


def qa(s):
    s += pl.user("What is the capital of France?")
    s += pl.assistant(pl.gen("answer", max_tokens=16))


def test_run_return_logprob_records_token_logprobs_and_draws_a_heat_map():
    backend = MockBackend({"capital": " The capital is <script>x</script> \"Paris\"."})
    state = pl.function(qa).run(backend=backend, return_logprob=True)
    record = state.calls[0]
    entries = record.output_token_logprobs
    assert entries == state.get_meta_info("answer")["output_token_logprobs"] and len(entries) == record.completion_tokens
    assert backend.calls_of("generate")[0].return_logprob is True

    html = state._repr_html_()
    spans = token_spans(html)
    assert [text for _, _, text in spans] == [e[2] for e in entries]  # one span per output token, in order
    assert "".join(text for _, _, text in spans) == state["answer"]
    for (bg, title, token), (logprob, token_id, _) in zip(spans, entries):
        p = math.exp(logprob)
        assert bg == f"hsl({120 * p:.0f},80%,80%)"  # red (p=0) .. green (p=1)
        assert title == f"p={p:.4f}  logprob={logprob:.4f}  token={token!r} (id {token_id})"
    assert "<script>" not in html and "&lt;script&gt;" in html  # the model's text never becomes markup
    assert '<span class="plait-gen" title="gen answer"><span class="plait-tok"' in html
    assert "token probability 0" in html  # the legend


def test_gen_return_logprob_and_top_alternatives_in_the_tooltip():
    backend = MockBackend({"capital": " Paris ."})
    state = pl.function(qa).run(backend=backend, top_logprobs_num=3)  # implies return_logprob
    titles = [title for _, title, _ in token_spans(state._repr_html_())]
    tops = state.calls[0].output_top_logprobs
    assert len(titles) == 2 and all(len(t) == 3 for t in tops)
    assert titles[0].endswith("\ntop: " + ", ".join(f"{a[2]!r} {math.exp(a[0]):.3f}" for a in tops[0]))

    @pl.function
    def two(s):
        s += "A:" + pl.gen("a", max_tokens=4, return_logprob=True)
        s += "\nB:" + pl.gen("b", max_tokens=4)

    state = two.run(backend=MockBackend(default=" x y"))
    assert [c.output_token_logprobs is not None for c in state.calls] == [True, False]
    assert len(token_spans(state._repr_html_())) == 2  # only gen "a" is a heat map


def test_heat_map_is_capped_and_falls_back_to_plain_text(monkeypatch):
    backend = MockBackend({"capital": " one two three four five six"})
    monkeypatch.setattr(view, "MAX_HEATMAP_TOKENS", 3)
    html = pl.function(qa).run(backend=backend, return_logprob=True)._repr_html_()
    assert [t for _, _, t in token_spans(html)] == [" one", " two", " three"]
    assert '<span title="3 tokens shown"> four five six</span>' in html

    text = "Paris."
    extra = CallRecord("gen", "a", output_token_logprobs=[(-0.1, 1, "Par"), (-0.2, 2, "is"), (-0.3, 3, "."), (-0.4, 4, "<|im_end|>")])
    assert [t for _, _, t in token_spans(view._heatmap(text, extra))] == ["Par", "is", "."]  # a trimmed stop token is dropped
    no_text = CallRecord("gen", "a", output_token_logprobs=[(-0.1, 1, None), (-0.2, 2, None)])
    assert view._heatmap(text, no_text) is None  # a backend without token texts: plain text
    partial = CallRecord("gen", "a", output_token_logprobs=[(-0.1, 1, "Pa"), (-0.2, 2, "XX")])
    assert view._heatmap(text, partial).endswith(">Pa</span><span>ris.</span>")


def test_select_shows_every_choice_with_its_score_and_marks_the_chosen_one():
    choices = ["yes", "no", "<img src=x onerror=alert(1)>"]
    backend = MockBackend(choice_logprobs={"yes": [-0.5, -0.1], "no": [-0.2], choices[2]: [-3.0]})
    state = pl.function(lambda s: s.__iadd__("Sure? " + pl.select("sure", choices=choices))).run(backend=backend)
    record = state.calls[0]
    assert (record.choices, record.chosen, record.choices_method) == (choices, 1, "token_length_normalized")
    assert record.choice_scores == pytest.approx([-0.3, -0.2, -3.0])  # the mean token logprob the method compared
    html = state._repr_html_()
    chips = re.findall(r'<span class="(plait-choice[^"]*)" title="([^"]*)">([^<]*)</span>', html)
    assert [(cls, unescape(text)) for cls, _, text in chips] == [
        ("plait-choice", "yes -0.300"), ("plait-choice plait-chosen", "\u2713 no -0.200"),
        ("plait-choice", "<img src=x onerror=alert(1)> -3.000"),
    ]
    assert unescape(chips[1][1]) == "'no': score -0.200 (token_length_normalized), chosen"
    assert "<img" not in html


def test_select_score_is_the_one_its_method_compared():
    backend = MockBackend(choice_logprobs={"a": [-1.0], "b": [-0.5]}, unconditional_logprobs={"a": [-3.0], "b": [-0.6]})
    prog = pl.function(lambda s: s.__iadd__("Q " + pl.select("c", choices=["a", "b"], choices_method="unconditional_likelihood_normalized")))
    record = prog.run(backend=backend).calls[0]
    assert record.choice_scores == pytest.approx([2.0, 0.1]) and record.chosen == 0  # conditional - unconditional
    assert record.choices_method == "unconditional_likelihood_normalized"


def test_select_choices_are_capped(monkeypatch):
    monkeypatch.setattr(view, "MAX_CHOICES", 2)
    html = pl.function(lambda s: s.__iadd__("Q " + pl.select("c", choices=list("abcde")))).run(backend=MockBackend())._repr_html_()
    assert len(re.findall(r'class="plait-choice( plait-chosen)?"', html)) == 2 and "+3 more choices" in html


def test_totals_line_and_bordered_calls_table():
    backend = MockBackend({"capital": " Paris", "again": " Paris again"})

    @pl.function
    def prog(s):
        qa(s)
        s += pl.user("Say it again")
        s += pl.assistant(pl.gen("again", max_tokens=8))

    state = prog.run(backend=backend)
    calls = state.calls
    prompt, cached = sum(c.prompt_tokens for c in calls), sum(c.cached_tokens for c in calls)
    output, latency = sum(c.completion_tokens for c in calls), sum(c.latency_s for c in calls)
    assert cached > 0 and output == 3
    html = state._repr_html_()
    totals = re.search(r'<div class="plait-totals">([^<]*)</div>', html).group(1)
    assert totals == (
        f"2 calls \u00b7 {prompt} prompt tokens, {cached} cached ({100 * cached / prompt:.0f}%) \u00b7 {output} output "
        f"tokens \u00b7 latency {view._ms(latency)} (sum over calls)"
    )
    assert ".plait-state table.plait-calls{border-collapse:collapse;border:1px solid #999" in html
    assert ".plait-state table.plait-calls th,.plait-state table.plait-calls td{border:1px solid #999" in html
    assert view._ms(0.0123) == "12.3 ms" and view._ms(2.5) == "2.50 s"


def test_calls_table_rows_are_capped(monkeypatch):
    monkeypatch.setattr(view, "MAX_CALL_ROWS", 2)

    @pl.function
    def prog(s):
        for i in range(5):
            s += f"{i}:" + pl.gen(max_tokens=2)

    html = prog.run(backend=MockBackend(default=" x"))._repr_html_()
    assert html.count("<tr><td>gen</td>") == 2 and "3 more calls not shown" in html
    assert '<div class="plait-totals">5 calls' in html


def test_names_and_errors_are_escaped():
    backend = MockBackend(default=" ok")
    prog = pl.function(lambda s: s.__iadd__("x" + pl.gen('<b a="1">', max_tokens=2)))
    html = prog.run(backend=backend)._repr_html_()
    assert 'title="gen &lt;b a=&quot;1&quot;&gt;"' in html and "<td>&lt;b a=&quot;1&quot;&gt;</td>" in html


@pytest.mark.parametrize("bad", [{"return_logprob": "yes"}, {"top_logprobs_num": -1}, {"top_logprobs_num": True}])
def test_run_logprob_options_are_validated(bad):
    with pytest.raises(ValueError, match="return_logprob|top_logprobs_num"):
        pl.function(qa).run(backend=MockBackend(), **bad)


def test_run_batch_return_logprob():
    prog = pl.function(lambda s, q: s.__iadd__(q + pl.gen("a", max_tokens=4)))
    states = prog.run_batch([{"q": "A:"}, {"q": "B:"}], backend=MockBackend(default=" x y"), return_logprob=True)
    assert all(len(st.calls[0].output_token_logprobs) == 2 for st in states)
    assert len(token_spans(states[1]._repr_html_())) == 2
