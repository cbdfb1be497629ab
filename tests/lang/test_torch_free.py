"""plait.lang (and ``import plait`` with the DSL names) work where torch cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockHeavy(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "triton", "numpy"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockHeavy())
    import plait as pl
    from plait.lang import MockBackend

    @pl.function
    def prog(s, q):
        s += pl.user(q)
        s += pl.assistant(pl.gen("a", max_tokens=4))
        forks = s.fork(2)
        forks += pl.select("c", choices=["x", "y"])
        forks.join()

    state = prog.run("capital of France?", backend=MockBackend({"capital": " Paris"}))
    assert state["a"] == " Paris" and len(state["c"]) == 2, state.text()
    assert "constant prefix" in str(prog.trace())
    assert prog.run_batch([{"q": "a"}, {"q": "b"}], backend=MockBackend())[1]["a"] == "mock output"
    state._repr_html_()
    try:
        pl.Engine
    except ImportError:
        pass
    else:
        raise AssertionError("Engine should need torch")
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "numpy"))
    assert not heavy, heavy
    print("ok")
    """
)


def test_language_runs_without_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
