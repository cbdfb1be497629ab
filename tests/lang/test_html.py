"""ProgramState._repr_html_: roles, highlighted generated spans, call table, escaping."""

from __future__ import annotations

import re

import pytest

import plait as pl
from plait.lang import MockBackend


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
