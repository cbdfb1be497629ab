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
