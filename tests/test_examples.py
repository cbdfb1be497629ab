"""The README's main job: the quickstart example runs on the bundled model and prints its results."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_runs(bundled_model_dir, capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "Q: What is the capital of France?" in out
    assert "Paris" in out
    assert "cached tokens on the second pass:" in out
    assert "Streaming: " in out and "7" not in out.split("Streaming: ")[1].split("\n")[0]  # stop string "7"
