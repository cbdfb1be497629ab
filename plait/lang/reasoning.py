"""``pl.separate_reasoning``: keep a reasoning model's reasoning apart from its answer (SGLang's API).

``s += pl.assistant(pl.separate_reasoning(pl.gen("answer"), model_type="qwen3"))`` generates as usual;
the output is split by the reasoning parser ``model_type`` (``plait.reasoning.PARSERS``): ``s["answer"]``
holds the answer and ``s["answer_reasoning_content"]`` the reasoning. As in SGLang, only the answer
stays in the prompt (and in ``s.messages()``), as chat templates drop earlier turns' reasoning. Unlike
SGLang's, it also works with ``stream=True``: both variables grow as the text arrives.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from plait.lang.ir import Gen, Node, Seq, to_node
from plait.reasoning import PARSERS, ReasoningSplit, make_reasoning_parser

__all__ = ["REASONING_SUFFIX", "ReasoningStream", "reasoning_sampling", "reasoning_var", "separate_reasoning"]

#: The reasoning of gen ``name`` is stored in variable ``name + REASONING_SUFFIX`` (SGLang's naming).
REASONING_SUFFIX = "_reasoning_content"


def reasoning_var(name: str) -> str:
    """The variable that holds the reasoning of the gen named ``name``."""
    return f"{name}{REASONING_SUFFIX}"


def separate_reasoning(expr: Any = None, model_type: str | None = None) -> Node:
    """``expr`` (a gen, or nodes containing gens) with every gen's reasoning kept apart from its answer.

    ``model_type``: the reasoning parser, one of ``plait.reasoning.PARSERS`` ("qwen3", "deepseek-r1",
    "gpt-oss"). Every gen in ``expr`` must be named: its reasoning goes to ``name + "_reasoning_content"``.
    """
    if model_type not in PARSERS:
        raise ValueError(f"separate_reasoning needs model_type, one of {', '.join(PARSERS)}; got {model_type!r}")
    if expr is None:
        raise ValueError("separate_reasoning needs an expression with a gen: separate_reasoning(pl.gen('answer'), ...)")
    node, count = _mark(to_node(expr), model_type)
    if count == 0:
        raise ValueError("separate_reasoning found no gen in its expression; wrap the pl.gen(...) whose output "
                         "holds the reasoning")
    return node


def _mark(node: Node, model_type: str) -> tuple[Node, int]:
    if isinstance(node, Gen):
        if node.name is None:
            raise ValueError("separate_reasoning needs a named gen: its reasoning is stored in "
                             "'<name>_reasoning_content'")
        return replace(node, reasoning=model_type), 1
    if isinstance(node, Seq):
        marked = [_mark(child, model_type) for child in node.nodes]
        return Seq(tuple(n for n, _ in marked)), sum(c for _, c in marked)
    return node, 0


class ReasoningStream:
    """Splits one gen's output, fed as it arrives, into ``reasoning`` and ``content`` (the answer)."""

    def __init__(self, model_type: str, prompt: str) -> None:
        self.parser = make_reasoning_parser(model_type, prompt)
        self.reasoning = ""
        self.content = ""

    def feed(self, delta: str) -> str:
        """Take the next piece of output; returns the answer text it makes safe to show."""
        return self._add(self.parser.feed(delta))

    def finish(self) -> str:
        """The output ended; returns the answer text that was held back."""
        return self._add(self.parser.finish())

    def _add(self, split: ReasoningSplit) -> str:
        self.reasoning += split.reasoning
        self.content += split.content
        return split.content


def reasoning_sampling(model_type: str | None, params: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields a gen with this parser needs: gpt-oss's channels are special tokens."""
    if model_type == "gpt-oss":
        return {**params, "skip_special_tokens": False}
    return params
