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


# Test files that share a session-wide resource run on one pytest-xdist worker, in collection order, so
# that the resource starts once and the last of them can stop it: the default server's users (the
# default_server fixture; tests/server/test_native_api.py, last in order, stops it).
XDIST_SHARED_FILES = {
    "tests/lang/backends/test_endpoint_backend.py": "default_server",
    "tests/server/test_native_api.py": "default_server",
}
# The slowest files (seconds on a 2-core machine, 2026-12-03) start first, so that no long file is left
# running alone at the end of a distributed run; the rest follow in collection order.
XDIST_SLOW_FILES = {
    "tests/runtime/kernels/test_fused_moe.py": 97, "tests/runtime/test_engine_exactness.py": 69,
    "tests/runtime/constrained/test_engine_constrained.py": 66, "default_server": 59,
    "tests/server/test_sglang_frontend_and_load.py": 49, "tests/server/test_openai_agents.py": 49,
    "tests/runtime/test_engine_api.py": 47, "tests/runtime/constrained/test_grammar_isolation.py": 40,
    "tests/test_notebooks.py": 38, "tests/test_examples.py": 35, "tests/runtime/test_tensor_parallel.py": 33,
    "tests/test_bench.py": 31, "tests/runtime/test_lora.py": 30, "tests/server/test_abuse.py": 29,
    "tests/server/test_native_fields.py": 28, "tests/server/test_openai_api.py": 28,
    "tests/runtime/kernels/test_extend_attention.py": 27, "tests/test_serving_run.py": 27,
    "tests/router/test_data_parallel.py": 26, "tests/lang/test_sglang_programs_bundled.py": 26,
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` (the README's test command): files as work units, as pytest-xdist does, with
    ``XDIST_SHARED_FILES`` grouped and ``XDIST_SLOW_FILES`` first."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedFirstSlowScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return XDIST_SHARED_FILES.get(path, path)

        def _assign_work_unit(self, node) -> None:
            if not getattr(self, "_slow_first", False):  # the queue is complete before the first assignment
                self._slow_first = True
                units = sorted(self.workqueue.items(), key=lambda unit: -XDIST_SLOW_FILES.get(unit[0], 0))
                self.workqueue.clear()
                self.workqueue.update(units)
            super()._assign_work_unit(node)

    return SharedFirstSlowScheduling(config, log)


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
    the rest of the run (on 2 workers its users run on one: ``XDIST_SHARED_FILES``); a module that asks
    for it afterwards gets a new one."""
    from tests.server.server_helpers import start_server

    server = _default_server_slot.get("server")
    if server is None or server.process.poll() is not None:
        server = _default_server_slot["server"] = start_server()
    return server
