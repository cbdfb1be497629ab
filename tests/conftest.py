"""Shared fixtures and markers.

- ``gpu`` tests are skipped without CUDA.
- ``bundled_model_dir`` converts (once, cached) the bundled SmolLM2-135M-Instruct GGUF into a
  Hugging Face style directory and returns its path.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def bundled_model_dir():
    from plait.runtime.models.registry import ensure_preset_dir

    return ensure_preset_dir("smollm2-135m-instruct")
