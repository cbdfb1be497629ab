"""Shared fixtures and markers.

- ``gpu`` tests are skipped without CUDA.
- ``bundled_model_dir`` converts (once, cached) the bundled SmolLM2-135M-Instruct GGUF into a
  Hugging Face style directory and returns its path.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    """Without CUDA, Triton kernels run through its CPU interpreter. ``TRITON_INTERPRET`` is read when a
    function is decorated, triton's own helpers (``tl.cdiv``) included, so it is set here, before any
    test module is collected: a module that imported triton first would otherwise leave those helpers
    compiled-mode and break interpreted kernels that call them (seen when model tests ran before layer
    tests)."""
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture(scope="module", autouse=True)
def _release_memory_after_each_module():
    """After each test module: collect its cycles and hand freed heap back to the OS (glibc keeps freed
    chunks of many threads' arenas), so that one module's engines do not raise the whole run's peak."""
    yield
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@pytest.fixture(scope="session")
def bundled_model_dir():
    from plait.runtime.models.registry import ensure_preset_dir

    return ensure_preset_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def _default_server_slot():
    slot: dict = {}
    yield slot
    if slot.get("server") is not None:
        assert slot["server"].stop() == 0, slot["server"].output()


@pytest.fixture(scope="module")
def default_server(bundled_model_dir, _default_server_slot):
    """One ``plait serve`` with default settings on the bundled model, shared by the modules that need
    nothing else (each server costs ~17 s to start on two cores). Tests that use it leave it idle and
    serving; a module that needs other flags, or stops its server, starts its own. The last module that
    uses it in a full run (tests/server/test_native_api.py) stops it, so that it holds no memory through
    the rest of the run; a module that asks for it afterwards gets a new one."""
    from tests.server.server_helpers import start_server

    server = _default_server_slot.get("server")
    if server is None or server.process.poll() is not None:
        server = _default_server_slot["server"] = start_server()
    return server
