"""The HTML view of forks: a nested section per branch at the fork point, joined or not, bounded."""

from __future__ import annotations

import re
import time
from html import unescape

import pytest

import plait as pl
import plait.lang.html as view
from plait.lang import MockBackend


def branch_output(call) -> str:
    """The output names the branch it was asked in (the last "branch N" in the prompt)."""
    branch = re.findall(r"branch (\d+)", call.prompt)[-1]
    return f" text of branch {branch} <i>"


def backend() -> MockBackend:
    return MockBackend({"branch": branch_output}, default=" after")


def sections(html: str) -> list[str]:
    """The branch summaries, unescaped, in order."""
    return [unescape(s) for s in re.findall(r"<summary>([^<]*)</summary>", html)]


@pytest.mark.parametrize("mode", ["gather_variable", "concate_and_append"])
def test_joined_fork_is_a_section_per_branch_at_the_fork_point(mode):
    @pl.function
    def prog(s):
        s += "Before the fork."
        forks = s.fork(2)
        forks += lambda i: f" branch {i}:" + pl.gen("x", max_tokens=8)
        forks.join(mode)
        s += " After the join:" + pl.gen("y", max_tokens=2)

    html = prog.run(backend=backend())._repr_html_()
    assert f"fork: 2 branches, joined ({mode})</div>" in html
    assert sections(html) == [f"branch {i}: joined ({mode}), 1 call, 5 output tokens" for i in range(2)]
    bodies = re.findall(r'<div class="plait-branch-body">(.*?)</div></details>', html)
    assert bodies == [
        f'<span class="plait-plain"> branch {i}:</span><span class="plait-plain"><span class="plait-gen" title="gen x">'
        f" text of branch {i} &lt;i&gt;</span></span>"
        for i in range(2)
    ]
    assert html.index("Before the fork.") < html.index('class="plait-fork"') < html.index(" After the join:")
    assert "<i>" not in html


def test_branches_never_joined_are_shown_too():
    @pl.function
    def prog(s):
        s += "Q."
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f" branch {i}:" + pl.gen("x", max_tokens=8)

    html = prog.run(backend=backend())._repr_html_()
    assert "fork: 3 branches, not joined</div>" in html
    assert [s.split(",")[0] for s in sections(html)] == [f"branch {i}: not joined" for i in range(3)]
    assert all(f"text of branch {i} &lt;i&gt;" in html for i in range(3))
    assert "<td>x (fork 2)</td>" in html  # their calls are in the table


def test_nested_forks_and_a_fork_inside_a_role_block():
    @pl.function
    def prog(s):
        s += pl.user("Plan.")
        with s.assistant():
            s += "Options:"
            outer = s.fork(2)
            outer += lambda i: f" branch {i}:" + pl.gen("x", max_tokens=8)
            inner = outer[1].fork(2)
            inner += lambda i: f" branch 1{i}:" + pl.gen("z", max_tokens=8)
            inner.join()
            outer.join()
            s += " Done."

    html = prog.run(backend=backend())._repr_html_()
    assistant = html[html.index('<div class="plait-role">assistant</div>'):]
    assert assistant.index("Options:") < assistant.index('class="plait-fork"') < assistant.index(" Done.")  # inside the box
    assert sections(html) == [
        "branch 0: joined (gather_variable), 1 call, 5 output tokens",
        "branch 1: joined (gather_variable), 3 calls, 15 output tokens",  # its own call and its branches'
        "branch 0: joined (gather_variable), 1 call, 5 output tokens",
        "branch 1: joined (gather_variable), 1 call, 5 output tokens",
    ]
    branch_1 = html[html.index(" branch 1:"):]
    assert branch_1.index('class="plait-fork"') < branch_1.index("text of branch 10") < branch_1.index("text of branch 11")
    assert html.count('<div class="plait-role">assistant (continued)</div>') == 4  # each branch continues the block
    assert "(open)" not in html


def test_branch_count_and_nesting_are_bounded(monkeypatch):
    monkeypatch.setattr(view, "MAX_BRANCHES", 2)
    monkeypatch.setattr(view, "MAX_FORK_DEPTH", 1)

    @pl.function
    def prog(s):
        forks = s.fork(5)
        forks += lambda i: f" branch {i}:" + pl.gen("x", max_tokens=8)
        deeper = forks[0].fork(2)
        deeper += " branch 9:" + pl.gen("y", max_tokens=8)
        deeper.join()
        forks.join()

    html = prog.run(backend=backend())._repr_html_()
    assert len(sections(html)) == 2 and "3 more branches not shown" in html
    assert "nested deeper than 1 forks: not shown" in html and "text of branch 9" not in html


def test_a_failing_branch_shows_its_error():
    @pl.function
    def prog(s):
        forks = s.fork(2)
        forks[0] += " branch 0:" + pl.gen("x", max_tokens=8)
        forks[1] += " branch 1:" + pl.select("c", choices=["a", "b"])
        forks.join()

    state = prog.run(backend=MockBackend({"branch": branch_output}, supports_select=False), stream=True)
    deadline = time.monotonic() + 10
    while state.error() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(state.error(), pl.lang.BackendCapabilityError)
    html = state._repr_html_()
    assert "branch 1: error" in html and html.count("error: BackendCapabilityError") >= 1
