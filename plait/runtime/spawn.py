"""Starting plait's helper processes (grammar compile workers, tensor-parallel ranks, a server's engine
and detokenizer) with multiprocessing's "spawn" start method, whatever ``__main__`` is.

A spawned child first re-creates the parent's ``__main__``: by module name (``python -m``) or by
running ``__main__.__file__`` again (a script). Where ``__main__`` is not a file -- a script read from
stdin (``python - <<EOF``) has ``__file__ == "<stdin>"`` -- the child dies at once with
``FileNotFoundError``, and the parent, still writing the child's arguments into a pipe it keeps open
itself, blocks in ``Process.start`` forever. multiprocessing already leaves ``__main__`` alone when it
has no ``__file__`` (``python -c``, an interactive session, a notebook); ``start_process`` extends that
rule to a ``__file__`` that names no file.

A helper that starts but never says it is ready is bounded by its owner's start-up timeout, which raises
a ``HelperStartError`` (or a subclass) instead of waiting for ever.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
from collections.abc import Iterator
from multiprocessing import process as mp_process
from typing import Any

__all__ = ["HelperStartError", "main_file_to_hide", "start_process", "unrunnable_main_hidden"]

_start_lock = threading.RLock()  # the attributes below are process-wide: one start at a time
_MISSING = object()


class HelperStartError(RuntimeError):
    """A helper process did not start: it exited, or it did not report ready within its start-up timeout."""


def main_file_to_hide() -> str | None:
    """The ``__main__.__file__`` a spawned child would try, and fail, to run again: set, not imported by
    module name, and naming no file (``"<stdin>"``, a deleted script). None when there is nothing to hide."""
    main = sys.modules.get("__main__")
    if main is None or getattr(getattr(main, "__spec__", None), "name", None) is not None:
        return None  # re-created by module name (``python -m``), never from a path
    path = getattr(main, "__file__", None)
    if path is None:
        return None
    if not os.path.isabs(path) and mp_process.ORIGINAL_DIR is not None:
        path = os.path.join(mp_process.ORIGINAL_DIR, path)  # where the child will look, as multiprocessing does
    return None if os.path.isfile(path) else main.__file__


@contextlib.contextmanager
def unrunnable_main_hidden() -> Iterator[None]:
    """Within the block, a ``__main__.__file__`` that names no file is removed (and put back after), so
    that processes spawned meanwhile start without re-running ``__main__``, as from ``python -c``.

    Other threads of this process see ``__main__`` without ``__file__`` for the length of the block."""
    with _start_lock:
        hidden = main_file_to_hide()
        main = sys.modules.get("__main__")
        if hidden is not None:
            del main.__file__
        try:
            yield
        finally:
            if hidden is not None and getattr(main, "__file__", _MISSING) is _MISSING:
                main.__file__ = hidden


def start_process(process: multiprocessing.process.BaseProcess, *, from_daemon: bool = False) -> None:
    """``process.start()`` for a spawned helper, safe from any ``__main__`` (``unrunnable_main_hidden``).

    ``from_daemon``: allow the start when this process is itself a daemonic multiprocessing child (which
    multiprocessing refuses, as it cannot promise to clean up grandchildren): only for helpers that end
    themselves once their parent is gone."""
    with _start_lock, unrunnable_main_hidden():
        config: dict[str, Any] = multiprocessing.current_process()._config  # no public switch exists
        was_daemon = config.pop("daemon", None) if from_daemon else None
        try:
            process.start()
        finally:
            if was_daemon is not None:
                config["daemon"] = was_daemon
