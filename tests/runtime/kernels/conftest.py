"""Kernel tests run on a CUDA GPU when there is one, else through Triton's CPU interpreter.

Importing ``tests.runtime.triton_support`` sets ``TRITON_INTERPRET`` before any test module imports
``plait.runtime.kernels``. ``kernel_device`` skips with a reason when Triton is missing or when
kernels were imported (compiled mode) before the variable was set.
"""

from __future__ import annotations

import pytest

from tests.runtime.triton_support import HAS_CUDA, kernels_usable


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """'cuda' on a GPU machine, 'cpu' under the interpreter; skips when neither can run kernels."""
    reason = kernels_usable()
    if reason is not None:
        pytest.skip(reason)
    return "cuda" if HAS_CUDA else "cpu"
