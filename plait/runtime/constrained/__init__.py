"""Constrained decoding: spec -> cached compiler -> compiled grammar -> one matcher per request.

See docs/constrained.md. Backends: llguidance and outlines-core (each optional; a constraint that needs
a missing one is a clear ``ConstraintError``).
"""

from plait.runtime.constrained.compiler import DEFAULT_BACKENDS, GrammarCompiler
from plait.runtime.constrained.matcher import GrammarState
from plait.runtime.constrained.service import ConstrainedDecoding
from plait.runtime.constrained.spec import (
    ConstraintError,
    ConstraintKind,
    ConstraintSpec,
    spec_from_params,
)
from plait.runtime.constrained.vocab import TokenizerInfo

__all__ = [
    "DEFAULT_BACKENDS",
    "ConstrainedDecoding",
    "ConstraintError",
    "ConstraintKind",
    "ConstraintSpec",
    "GrammarCompiler",
    "GrammarState",
    "TokenizerInfo",
    "spec_from_params",
]
