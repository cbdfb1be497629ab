"""The reasoning parsers of ``plait serve`` (``--reasoning-parser``): defined in ``plait.reasoning``, which the
language shares."""

from plait.reasoning import (
    PARSERS,
    HarmonyReasoningParser,
    ReasoningParser,
    ReasoningSplit,
    make_reasoning_parser,
)

__all__ = ["PARSERS", "HarmonyReasoningParser", "ReasoningParser", "ReasoningSplit", "make_reasoning_parser"]
