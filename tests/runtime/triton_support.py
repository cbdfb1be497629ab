"""Running Triton kernels in tests: on a CUDA GPU when there is one, else through the CPU interpreter.

``TRITON_INTERPRET`` is read when a kernel is decorated, so importing this module sets it (without
CUDA) and must happen before anything imports ``plait.runtime.kernels``. ``kernels_usable`` says why
kernels cannot run here, if they cannot.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def fix_interpreter_scalar_index() -> None:
    """Triton <= 3.6's interpreter calls ``int()`` on 1-element arrays, an error with numpy >= 2.4.

    A loop with a run-time bound (``range(start, end)``) then fails (triton-lang/triton#9171, fixed
    upstream by squeezing first). This wraps the interpreter's tensor patching to do the same.
    """
    try:
        int(np.zeros(1))
        return  # this numpy still converts; nothing to fix
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "plait_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.plait_fixed = True
    interpreter._patch_lang_tensor = patched


def kernels_usable() -> str | None:
    """None if kernels can run here, else the reason they cannot."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if HAS_CUDA:
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA GPU and TRITON_INTERPRET is not 1"
    from triton.runtime.jit import JITFunction

    for name, module in list(sys.modules.items()):
        if name.startswith("plait.runtime.kernels.") and any(
            isinstance(obj, JITFunction) for obj in vars(module).values()
        ):
            return f"{name} was imported in compiled mode before TRITON_INTERPRET was set"
    fix_interpreter_scalar_index()
    return None
