"""Select scoring: how ``pl.select`` picks one choice from the backend's per-token logprobs.

The backend scores every ``prefix + choice`` continuation (``Backend.score_choices`` ->
``ChoiceScores``); a ``ChoicesMethod`` turns those scores into a ``ChoicesDecision``. Three methods,
with SGLang's names and semantics:

- ``token_length_normalized`` (default): the highest mean token logprob.
- ``greedy_token_selection``: compare choices token by token, keep those with the best logprob at each
  position until one remains; a shorter choice is padded with its own mean logprob.
- ``unconditional_likelihood_normalized``: the highest mean of (logprob given the prefix - logprob
  without it), which discounts choices that are likely regardless of the question.

Every decision keeps all scores in ``meta_info`` (``s.get_meta_info(name)``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from plait.lang.backends.base import ChoiceScores

__all__ = [
    "ChoicesDecision",
    "ChoicesMethod",
    "GreedyTokenSelection",
    "TokenLengthNormalized",
    "UnconditionalLikelihoodNormalized",
    "greedy_token_selection",
    "resolve_choices_method",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
]


@dataclass
class ChoicesDecision:
    """The chosen text, its index in the choices, and every score that led there."""

    decision: str
    index: int
    meta_info: dict[str, Any] = field(default_factory=dict)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("-inf")


def _argmax_first(values: Sequence[float]) -> int:
    """Index of the largest value (the first on ties); NaN never wins."""
    best = 0
    for i, v in enumerate(values):
        if not math.isnan(v) and (math.isnan(values[best]) or v > values[best]):
            best = i
    return best


def base_meta(scores: Sequence[ChoiceScores]) -> dict[str, Any]:
    """Scores every method reports: raw per-token logprobs (SGLang's ``input_token_logprobs`` entries
    ``(logprob, token_id, None)``; token id -1 when the backend did not report ids) and their means."""
    entries = []
    for s in scores:
        ids = s.token_ids if s.token_ids is not None else [-1] * len(s.token_logprobs)
        entries.append([(lp, tid, None) for lp, tid in zip(s.token_logprobs, ids)])
    return {
        "choices": [s.choice for s in scores],
        "token_logprobs": [list(s.token_logprobs) for s in scores],
        "input_token_logprobs": entries,
        "normalized_prompt_logprobs": [_mean(s.token_logprobs) for s in scores],
        "prompt_tokens": [s.prompt_tokens for s in scores],
        "cached_tokens": [s.cached_tokens for s in scores],
    }


class ChoicesMethod(ABC):
    """A strategy that picks one choice from its ``ChoiceScores``."""

    #: the name ``select(choices_method=...)`` accepts and meta_info reports
    name: str = ""

    @property
    def requires_unconditional_logprobs(self) -> bool:
        """Whether the backend must also score the choices without the prefix."""
        return False

    @abstractmethod
    def __call__(self, scores: Sequence[ChoiceScores]) -> ChoicesDecision:
        """Decide; ``scores`` has one entry per choice, in the order of the choices."""

    def _decide(self, scores: Sequence[ChoiceScores], index: int, meta: dict[str, Any]) -> ChoicesDecision:
        meta["method"] = self.name
        meta["decision"] = scores[index].choice
        meta["index"] = index
        return ChoicesDecision(scores[index].choice, index, meta)

    def __repr__(self) -> str:
        return self.name


class TokenLengthNormalized(ChoicesMethod):
    """The choice with the highest mean token logprob given the prefix."""

    name = "token_length_normalized"

    def __call__(self, scores: Sequence[ChoiceScores]) -> ChoicesDecision:
        meta = base_meta(scores)
        return self._decide(scores, _argmax_first(meta["normalized_prompt_logprobs"]), meta)


class GreedyTokenSelection(ChoicesMethod):
    """Token-by-token elimination: at each position keep the choices with the best logprob.

    A choice shorter than the longest is padded with its own mean logprob, so a choice that is a
    prefix of another competes on equal length (SGLang's rule).
    """

    name = "greedy_token_selection"

    def __call__(self, scores: Sequence[ChoiceScores]) -> ChoicesDecision:
        meta = base_meta(scores)
        width = max(len(s.token_logprobs) for s in scores)
        matrix = []
        for s in scores:
            row = list(s.token_logprobs)
            row += [_mean(s.token_logprobs)] * (width - len(row))
            matrix.append(row)
        remaining = list(range(len(scores)))
        for j in range(width):
            best = max(matrix[i][j] for i in remaining)
            remaining = [i for i in remaining if matrix[i][j] == best]
            if len(remaining) == 1:
                break
        meta["greedy_logprob_matrix"] = matrix
        return self._decide(scores, remaining[0], meta)


class UnconditionalLikelihoodNormalized(ChoicesMethod):
    """The choice with the highest mean of (conditional - unconditional) token logprob.

    The first unconditional logprob has no context (backends report NaN or None there); it counts
    as 0, as in SGLang.
    """

    name = "unconditional_likelihood_normalized"

    @property
    def requires_unconditional_logprobs(self) -> bool:
        return True

    def __call__(self, scores: Sequence[ChoiceScores]) -> ChoicesDecision:
        meta = base_meta(scores)
        normalized = []
        for s in scores:
            uncond = s.unconditional_token_logprobs
            if uncond is None:
                raise ValueError(
                    f"choice {s.choice!r} has no unconditional logprobs; the backend must score with "
                    "unconditional=True for unconditional_likelihood_normalized"
                )
            if len(uncond) != len(s.token_logprobs):
                raise ValueError(
                    f"choice {s.choice!r}: {len(s.token_logprobs)} conditional but {len(uncond)} "
                    "unconditional token logprobs; the backend must score the same tokens both ways"
                )
            uncond = [0.0 if (i == 0 and (u is None or math.isnan(u))) else u for i, u in enumerate(uncond)]
            normalized.append(_mean([c - u for c, u in zip(s.token_logprobs, uncond)]))
        meta["unconditional_token_logprobs"] = [list(s.unconditional_token_logprobs or []) for s in scores]
        meta["normalized_unconditional_prompt_logprobs"] = normalized
        return self._decide(scores, _argmax_first(normalized), meta)


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()

_BY_NAME = {m.name: m for m in (token_length_normalized, greedy_token_selection, unconditional_likelihood_normalized)}


def resolve_choices_method(method: ChoicesMethod | str | None) -> ChoicesMethod:
    """A method object from itself, its name, or None (the default, token-length normalized)."""
    if method is None:
        return token_length_normalized
    if isinstance(method, ChoicesMethod):
        return method
    if isinstance(method, str) and method in _BY_NAME:
        return _BY_NAME[method]
    raise ValueError(
        f"unknown choices_method {method!r}; use one of {sorted(_BY_NAME)} or pl.token_length_normalized, "
        "pl.greedy_token_selection, pl.unconditional_likelihood_normalized (or a ChoicesMethod subclass)"
    )
