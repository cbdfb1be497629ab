"""Chat templates: how ``system`` / ``user`` / ``assistant`` blocks render into prompt text.

A ``ChatTemplate`` (defined with the Backend protocol) maps each role to a ``(prefix, suffix)`` pair.
Templates come from three places: the backend (``backend.chat_template()``, usually derived from the
model's own Jinja template with ``template_from_renderer``), a name (``get_chat_template("chatml")``),
or a ``ChatTemplate`` built by hand.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from plait.lang.backends.base import ChatTemplate
from plait.lang.errors import ChatTemplateError

__all__ = [
    "ChatTemplate",
    "get_chat_template",
    "list_chat_templates",
    "register_chat_template",
    "resolve_chat_template",
    "template_from_renderer",
]

_REGISTRY: dict[str, ChatTemplate] = {}
_LOCK = threading.Lock()


def register_chat_template(template: ChatTemplate, *, override: bool = False) -> None:
    """Make ``template`` available under ``template.name``; an existing name needs ``override=True``."""
    with _LOCK:
        if template.name in _REGISTRY and not override:
            raise ChatTemplateError(
                f"a chat template named {template.name!r} exists; pass override=True to replace it"
            )
        _REGISTRY[template.name] = template


def list_chat_templates() -> list[str]:
    """The names ``get_chat_template`` knows."""
    with _LOCK:
        return sorted(_REGISTRY)


def get_chat_template(name: str) -> ChatTemplate:
    """The named template (``"default"``, ``"chatml"``, ``"smollm2"``, ``"llama-3-instruct"``, ...)."""
    with _LOCK:
        template = _REGISTRY.get(name)
    if template is None:
        raise ChatTemplateError(
            f"unknown chat template {name!r}; known: {', '.join(list_chat_templates())}. Register one with "
            "plait.lang.chat_template.register_chat_template(ChatTemplate(...))"
        )
    return template


def resolve_chat_template(template: ChatTemplate | str) -> ChatTemplate:
    """A ``ChatTemplate`` from itself or its registered name."""
    if isinstance(template, ChatTemplate):
        return template
    if isinstance(template, str):
        return get_chat_template(template)
    raise ChatTemplateError(
        f"chat_template must be a template name or a ChatTemplate, got {type(template).__name__}"
    )


def _role_table(prefixes: dict[str, str], suffix: str) -> dict[str, tuple[str, str]]:
    return {role: (prefix, suffix) for role, prefix in prefixes.items()}


register_chat_template(
    ChatTemplate(
        name="default",
        role_prefix_and_suffix={"system": ("SYSTEM: ", "\n"), "user": ("USER: ", "\n"), "assistant": ("ASSISTANT: ", "\n")},
    )
)
_CHATML = _role_table({r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")}, "<|im_end|>\n")
register_chat_template(ChatTemplate(name="chatml", role_prefix_and_suffix=_CHATML, stop_str=("<|im_end|>",)))
# SmolLM2-Instruct's own template: ChatML that inserts this system prompt when none is given.
register_chat_template(
    ChatTemplate(
        name="smollm2",
        role_prefix_and_suffix=_CHATML,
        default_system_prompt="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        stop_str=("<|im_end|>",),
    )
)
# Llama 3 / 3.1 instruct. The tokenizer adds <|begin_of_text|> itself, so the template leaves it out.
register_chat_template(
    ChatTemplate(
        name="llama-3-instruct",
        role_prefix_and_suffix=_role_table(
            {r: f"<|start_header_id|>{r}<|end_header_id|>\n\n" for r in ("system", "user", "assistant")}, "<|eot_id|>"
        ),
        stop_str=("<|eot_id|>",),
    )
)

# Sentinels unlikely to occur in a template and left alone by filters such as ``trim``.
_S = {"A": "PLAITSENTINELAAA", "B": "PLAITSENTINELBBB", "C": "PLAITSENTINELCCC", "D": "PLAITSENTINELDDD", "E": "PLAITSENTINELEEE"}


def _between(text: str, first: str, second: str) -> str:
    start = text.index(first) + len(first)
    return text[start : text.index(second, start)]


def _strip_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise ChatTemplateError(f"cannot derive the {what}: {text!r} does not start with {prefix!r}")
    return text[len(prefix) :]


def _strip_suffix(text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise ChatTemplateError(f"cannot derive the {what}: {text!r} does not end with {suffix!r}")
    return text[: len(text) - len(suffix)]


def _render(render: Callable[[list[dict[str, str]]], str], roles_and_keys: list[tuple[str, str]]) -> str:
    text = render([{"role": role, "content": _S[key]} for role, key in roles_and_keys])
    if not isinstance(text, str):
        raise ChatTemplateError(f"render must return the prompt text (a str), got {type(text).__name__}")
    return text


def template_from_renderer(
    name: str, render: Callable[[list[dict[str, str]]], str], stop_str: tuple[str, ...] | None = None
) -> ChatTemplate:
    """Derive a ``ChatTemplate`` from a function that renders messages with a model's own template.

    ``render(messages)`` must return the prompt text for ``[{"role", "content"}, ...]`` WITHOUT a
    generation prompt, e.g. ``lambda m: tokenizer.apply_chat_template(m, tokenize=False)``. Sentinel
    conversations are rendered and the text around each sentinel gives the role prefixes and
    suffixes; a system prompt the template inserts when a conversation has none becomes
    ``default_system_prompt``. Text the template puts before everything (a BOS token such as
    ``<|begin_of_text|>``) is dropped: tokenizers add it when encoding. ``stop_str`` defaults to the
    assistant suffix without trailing whitespace. Templates that reject a system message get the
    user's prefix and suffix for it. Raises ``ChatTemplateError`` when the rendering has no
    consistent prefix/suffix structure.
    """
    full = [("user", "B"), ("assistant", "C"), ("user", "D"), ("assistant", "E")]
    try:
        text5 = _render(render, [("system", "A"), *full])
        text4 = _render(render, [("system", "A"), *full[:3]])
        has_system = True
    except ChatTemplateError:
        raise
    except Exception:  # noqa: BLE001 - any error: the template refuses system messages; derive without them
        text5 = _render(render, full)
        text4 = _render(render, full[:3])
        has_system = False
    user_then_assistant = _between(text5, _S["D"], _S["E"])
    user_suffix = text4[text4.index(_S["D"]) + len(_S["D"]) :]
    if user_suffix == user_then_assistant:
        raise ChatTemplateError(
            f"render for {name!r} appends a generation prompt; render without one "
            "(apply_chat_template(messages, tokenize=False, add_generation_prompt=False))"
        )
    assistant_prefix = _strip_prefix(user_then_assistant, user_suffix, "assistant prefix")
    assistant_suffix = text5[text5.index(_S["E"]) + len(_S["E"]) :]
    user_prefix = _strip_prefix(_between(text5, _S["C"], _S["D"]), assistant_suffix, "user prefix")
    if _between(text5, _S["B"], _S["C"]) != user_then_assistant:
        raise ChatTemplateError(f"template {name!r} renders the first and second turns differently")

    only_user = _render(render, [("user", "B")])
    before_user = _strip_suffix(only_user[: only_user.index(_S["B"])], user_prefix, "text before the first user turn")
    default_system: str | None = None
    if has_system:
        system_suffix = _strip_suffix(_between(text5, _S["A"], _S["B"]), user_prefix, "system suffix")
        lead_system = text5[: text5.index(_S["A"])]  # BOS + system prefix
        if before_user.startswith(lead_system) and before_user.endswith(system_suffix) and before_user:
            # The template inserted its own system message into a conversation that had none.
            default_system = before_user[len(lead_system) : len(before_user) - len(system_suffix)]
            # BOS is whatever precedes the system header (guessed as the user header with the role renamed).
            at = lead_system.find(user_prefix.replace("user", "system")) if "user" in user_prefix else -1
            bos = lead_system[:at] if at > 0 else ""
        else:
            bos = before_user
        system_prefix = _strip_prefix(lead_system, bos, "system prefix")
    else:
        system_prefix, system_suffix = user_prefix, user_suffix
    roles = {
        "system": (system_prefix, system_suffix),
        "user": (user_prefix, user_suffix),
        "assistant": (assistant_prefix, assistant_suffix),
    }
    if stop_str is None:
        stop = assistant_suffix.rstrip()
        stop_str = (stop,) if stop else ()
    return ChatTemplate(name=name, role_prefix_and_suffix=roles, default_system_prompt=default_system, stop_str=tuple(stop_str))
