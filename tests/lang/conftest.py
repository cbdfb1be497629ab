"""Fixtures of the language tests: a fresh MockBackend, and no default backend left behind."""

from __future__ import annotations

import pytest

import plait as pl
from plait.lang import MockBackend


@pytest.fixture(autouse=True)
def _no_default_backend():
    pl.set_default_backend(None)
    yield
    pl.set_default_backend(None)


@pytest.fixture
def mock() -> MockBackend:
    return MockBackend({"capital of France": " Paris", "Count": " one two three four five"}, default=" ok")


@pytest.fixture(scope="package")  # freed when the language tests end: later packages build their own engines
def shared_runtime(bundled_model_dir):
    """One Runtime on the bundled model, shared by the language tests that need a real model but no
    particular engine settings (float32: greedy results do not depend on the batch's shape)."""
    from plait.lang.backends.runtime import Runtime

    runtime = Runtime(model=str(bundled_model_dir), dtype="float32", max_total_tokens=8192)
    yield runtime
    runtime.shutdown()
