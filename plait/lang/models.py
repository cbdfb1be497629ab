"""Per-call models: which model (a LoRA adapter over the base model, or another model the backend
serves) serves each ``gen`` / ``select`` / ``call_tools`` of a program.

A call names its model with ``model=`` (``pl.gen("verdict", model="judge")``), or takes it from the
innermost ``with s.using(model=...)`` scope open when it was appended; None is the backend's default
(base) model. The scope is resolved when the node is appended (``with_model``), so the node the
interpreter executes, the trace and the call record all carry the model that serves the call.

Backends that serve per-call models say so with a true ``per_call_models`` attribute and take
``model=`` in ``score_choices`` and ``cache_prefix`` and ``GenerateCall.model`` in ``generate`` /
``stream``. A call that names a model on any other backend raises ``BackendCapabilityError``
(``model_kwargs``). KV computed under one model is never a prefix of another model's calls: the
language warms the cache (fork, ``run_batch``) under the model the following calls use.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from plait.lang.errors import BackendCapabilityError
from plait.lang.ir import Node, Seq

__all__ = ["check_model_name", "model_kwargs", "supports_models", "with_model"]

_MAX_NAME = 256


def check_model_name(model: Any, where: str) -> str | None:
    """``model`` if it is None or a usable model name; raises ``TypeError`` / ``ValueError`` naming ``where``."""
    if model is None:
        return None
    if not isinstance(model, str):
        raise TypeError(f"{where}: model must be a str (an adapter's or model's name) or None, got {type(model).__name__}")
    if not model or model != model.strip() or len(model) > _MAX_NAME:
        raise ValueError(
            f"{where}: model must be a non-empty name without surrounding whitespace, at most {_MAX_NAME} "
            f"characters, got {model!r}; None means the backend's default model"
        )
    return model


def _has_model_field(node: Node) -> bool:
    return any(f.name == "model" for f in fields(node))  # type: ignore[arg-type]


def with_model(node: Node, model: str | None) -> Node:
    """``node`` with every call in it that names no model (``model=None``) sent to ``model``.

    Applied when a node is appended inside ``s.using(model=...)``; a call that names its own model
    keeps it. Nodes without calls come back unchanged (the same object).
    """
    if model is None:
        return node
    if isinstance(node, Seq):
        children = tuple(with_model(child, model) for child in node.nodes)
        if all(a is b for a, b in zip(children, node.nodes)):
            return node
        return Seq(children)
    if hasattr(node, "__dataclass_fields__") and _has_model_field(node) and node.model is None:  # type: ignore[attr-defined]
        return replace(node, model=model)  # type: ignore[type-var]
    return node


def supports_models(backend: Any) -> bool:
    """Whether ``backend`` serves per-call models (its ``per_call_models`` attribute)."""
    return bool(getattr(backend, "per_call_models", False))


def model_kwargs(backend: Any, model: str | None, what: str) -> dict[str, Any]:
    """The keyword arguments that send ``what`` (e.g. ``"gen 'verdict'"``) to ``model`` on ``backend``:
    ``{}`` for the default model, ``{"model": model}`` otherwise. Raises ``BackendCapabilityError``
    when ``backend`` cannot serve per-call models."""
    if model is None:
        return {}
    if not supports_models(backend):
        name = getattr(backend, "name", type(backend).__name__)
        raise BackendCapabilityError(
            f"{what} asks for model {model!r}, but backend {name!r} serves one model and cannot send a call "
            "to another: use pl.Runtime(lora_paths=...), pl.Endpoint (a server started with --lora-paths) or "
            "pl.OpenAI, or drop model= / s.using(model=...)"
        )
    return {"model": model}
