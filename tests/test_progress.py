"""plait.progress: tqdm.auto without the missing-ipywidgets TqdmWarning in a Jupyter kernel.

Each check runs in a fresh interpreter that looks like a Jupyter kernel to tqdm (``ipykernel.zmqshell``
imported, an ``IPython`` whose ``get_ipython().config`` has ``IPKernelApp``: what tqdm versions look
for), so ``tqdm.auto`` is imported for the first time there, as in a notebook.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_KERNEL = """
import json, sys, types, warnings
ipython = types.ModuleType("IPython")
ipython.get_ipython = lambda: types.SimpleNamespace(config={"IPKernelApp": {}})
sys.modules["IPython"] = ipython
sys.modules["ipykernel.zmqshell"] = types.ModuleType("ipykernel.zmqshell")
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    BODY
print(json.dumps([f"{w.category.__name__}: {w.message}" for w in caught]))
"""


def warnings_in_kernel(body: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = FAKE_KERNEL.replace("BODY", body)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(importlib.util.find_spec("ipywidgets") is not None, reason="with ipywidgets tqdm does not warn")
def test_tqdm_auto_warns_in_a_kernel_without_ipywidgets():
    """The control: what plait avoids (so the tests below would fail without plait.progress)."""
    assert any("TqdmWarning: IProgress not found" in w for w in warnings_in_kernel("import tqdm.auto"))


def test_plait_progress_imports_tqdm_auto_quietly():
    caught = warnings_in_kernel(
        "from plait.progress import tqdm as bar_class; import tqdm.auto; assert bar_class is tqdm.auto.tqdm\n"
        "    bar = bar_class(total=2, desc='x'); bar.update(2); bar.close()"
    )
    assert not [w for w in caught if "Tqdm" in w]


def test_the_runtime_package_imports_it_before_transformers_can():
    """``import plait.runtime`` (which every engine import goes through) leaves no TqdmWarning for a
    later ``huggingface_hub`` / ``transformers`` import."""
    caught = warnings_in_kernel("import plait.runtime; import tqdm.auto")
    assert not [w for w in caught if "Tqdm" in w]


def test_run_batch_progress_bar_in_a_kernel():
    caught = warnings_in_kernel(
        "import plait as pl\n"
        "    from plait.lang import MockBackend\n"
        "    prog = pl.function(lambda s, q: s.__iadd__(q + pl.gen('a', max_tokens=2)))\n"
        "    states = prog.run_batch([{'q': 'A'}, {'q': 'B'}], backend=MockBackend(), progress_bar=True)\n"
        "    assert [st['a'] for st in states] == ['mock output'] * 2"
    )
    assert not [w for w in caught if "Tqdm" in w]
