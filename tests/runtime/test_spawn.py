"""plait.runtime.spawn: helper processes start from a ``__main__`` that is no file (a script read from
stdin), and from a daemonic process when asked."""

from __future__ import annotations

import multiprocessing
import os
import sys

import pytest

from plait.runtime.spawn import main_file_to_hide, start_process, unrunnable_main_hidden


@pytest.fixture
def stdin_main(monkeypatch):
    """Make this process's ``__main__`` look like a script read by ``python -``."""
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "__spec__", None, raising=False)
    monkeypatch.setattr(main, "__file__", "<stdin>", raising=False)
    return main


def test_a_main_read_from_stdin_is_hidden_and_put_back(stdin_main):
    assert main_file_to_hide() == "<stdin>"
    with unrunnable_main_hidden():
        assert not hasattr(stdin_main, "__file__")
        with unrunnable_main_hidden():  # nested (a start inside a start): still hidden, restored once
            assert not hasattr(stdin_main, "__file__")
        assert not hasattr(stdin_main, "__file__")
    assert stdin_main.__file__ == "<stdin>"


def test_the_main_is_put_back_when_the_start_fails(stdin_main):
    with pytest.raises(RuntimeError, match="boom"), unrunnable_main_hidden():
        raise RuntimeError("boom")
    assert stdin_main.__file__ == "<stdin>"


def test_a_real_script_or_a_module_main_is_left_alone(monkeypatch, tmp_path):
    main = sys.modules["__main__"]
    script = tmp_path / "script.py"
    script.write_text("")
    monkeypatch.setattr(main, "__spec__", None, raising=False)
    monkeypatch.setattr(main, "__file__", str(script), raising=False)
    assert main_file_to_hide() is None
    with unrunnable_main_hidden():
        assert main.__file__ == str(script)
    monkeypatch.setattr(main, "__file__", str(tmp_path / "deleted.py"), raising=False)
    assert main_file_to_hide() == str(tmp_path / "deleted.py")  # gone since it started: unrunnable too
    monkeypatch.setattr(main, "__spec__", type("Spec", (), {"name": "some.module"})())  # python -m
    assert main_file_to_hide() is None
    monkeypatch.delattr(main, "__file__")  # python -c, an interactive session
    monkeypatch.setattr(main, "__spec__", None)
    assert main_file_to_hide() is None


def test_a_spawned_child_starts_from_a_stdin_main(stdin_main):
    """The bug: a plain start makes the child run '<stdin>' again, and it dies; start_process's does not."""
    ctx = multiprocessing.get_context("spawn")
    plain = ctx.Process(target=os.getpid)
    plain.start()
    plain.join(30)
    assert plain.exitcode == 1  # FileNotFoundError: '<stdin>' (what the helpers hit before)
    helper = ctx.Process(target=os.getpid)
    start_process(helper)
    helper.join(30)
    assert helper.exitcode == 0
    assert stdin_main.__file__ == "<stdin>"


def test_from_daemon_allows_a_child_of_a_daemonic_process(monkeypatch):
    config = multiprocessing.current_process()._config
    monkeypatch.setitem(config, "daemon", True)
    ctx = multiprocessing.get_context("spawn")
    with pytest.raises(AssertionError, match="daemonic processes are not allowed"):
        start_process(ctx.Process(target=os.getpid))
    child = ctx.Process(target=os.getpid)
    start_process(child, from_daemon=True)
    child.join(30)
    assert child.exitcode == 0 and config["daemon"] is True
