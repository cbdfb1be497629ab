"""The primitives a program appends: ``gen``, ``select``, roles. Arguments are validated here, when the
program builds the node, so a bad argument fails at the line that wrote it."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from plait.lang.choices import ChoicesMethod, resolve_choices_method
from plait.lang.constraints import check_fields, check_json_schema
from plait.lang.errors import EmptyChoicesError, InvalidDtypeError, RoleError
from plait.lang.ir import ROLES, Gen, Media, Node, RoleBegin, RoleEnd, Select, Seq, to_node
from plait.lang.models import check_model_name
from plait.sampling import SamplingParams

__all__ = [
    "DTYPE_REGEX",
    "NUMBER_END",
    "ON_INCOMPLETE",
    "REGEX_BOOL",
    "REGEX_FLOAT",
    "REGEX_INT",
    "REGEX_STR",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "gen",
    "gen_float",
    "gen_int",
    "gen_string",
    "image",
    "parse_dtype",
    "role",
    "select",
    "system",
    "system_begin",
    "system_end",
    "user",
    "user_begin",
    "user_end",
    "video",
]

#: The value each ``gen(dtype=...)`` must be (the whole text, surrounding whitespace stripped).
DTYPE_REGEX: dict[type, str] = {
    int: r"-?\d+",
    float: r"-?\d+(\.\d+)?([eE][-+]?\d+)?",
    bool: r"(True|False)",
    str: r'"([^"\\\x00-\x1f]|\\["\\/bfnrt])*"',
}

#: How a number ends. ``\d+`` alone never ends (another digit is always allowed), so in plain text a
#: constrained number ran to ``max_tokens``. As in SGLang, an int/float gen is constrained to the
#: number followed by optional spaces/newlines (``DTYPE_REGEX[t] + NUMBER_END[0]``) and stops at the
#: first space or newline (``NUMBER_END[1]``, trimmed like any stop string).
NUMBER_END: tuple[str, tuple[str, ...]] = (r"[ \n]*", (" ", "\n"))

#: What a constrained gen does with output that is incomplete (cut by ``max_tokens``) or does not
#: parse: ``"raise"`` a ``GenerationError``, or ``"keep"`` the raw text and flag it in
#: ``meta_info["incomplete"]``.
ON_INCOMPLETE = ("raise", "keep")

#: SGLang's names (``sglang.lang.ir.REGEX_INT``...) for the regex of each dtype, as a gen of that dtype
#: is constrained (numbers with their end ``NUMBER_END[0]``). Also importable from ``plait.lang.ir``.
#: Unlike SGLang's ``REGEX_STR`` (``"[\w\d\s]*"``, which admits control characters), ``REGEX_STR`` is
#: exactly a JSON string.
REGEX_INT = DTYPE_REGEX[int] + NUMBER_END[0]
REGEX_FLOAT = DTYPE_REGEX[float] + NUMBER_END[0]
REGEX_BOOL = DTYPE_REGEX[bool]
REGEX_STR = DTYPE_REGEX[str]


def _schema_to_json(json_schema: Any) -> str:
    """A JSON string from a dict, a JSON string, or a pydantic model class."""
    if isinstance(json_schema, type) and hasattr(json_schema, "model_json_schema"):  # pydantic v2
        return check_json_schema(json.dumps(json_schema.model_json_schema()))
    if isinstance(json_schema, type) and hasattr(json_schema, "schema_json"):  # pydantic v1
        return check_json_schema(json_schema.schema_json())
    return check_json_schema(json_schema)


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    stop_regex: str | Sequence[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    repetition_penalty: float | None = None,
    ignore_eos: bool | None = None,
    seed: int | None = None,
    return_logprob: bool = False,
    top_logprobs_num: int = 0,
    dtype: type | None = None,
    choices: Sequence[str] | None = None,
    choices_method: ChoicesMethod | str | None = None,
    regex: str | None = None,
    json_schema: Any = None,
    ebnf: str | None = None,
    on_incomplete: str = "raise",
    model: str | None = None,
) -> Node:
    """Generate text and store it in variable ``name``.

    Unset sampling options take the run's defaults (``prog.run(..., temperature=0)``), then
    ``SamplingParams``' defaults. ``max_tokens`` is ``max_new_tokens``. Constraints (at most one):
    ``regex``, ``json_schema`` (dict, JSON string or pydantic model class), ``ebnf``, or ``dtype``
    (``int``, ``float``, ``bool``, ``str``: a regex, and the variable holds the converted value).
    ``choices`` makes this a ``select``. Inside an assistant block the template's stop strings are added.
    ``stop_regex``: a pattern (or a list) that ends the generation where the text matches it, cut there
    like a stop string. A regex or JSON schema that is malformed or uses what constrained decoding cannot
    serve (see ``plait.lang.constraints``) raises ``InvalidConstraintError`` here. An int/float ends at the first space or newline after the number (see
    ``NUMBER_END``). ``on_incomplete``: for ``dtype`` and ``json_schema``, output cut by ``max_tokens``
    or that does not parse (or, with a pydantic model, does not validate) raises ``GenerationError``
    (``"raise"``) or is kept as raw text with ``meta_info["incomplete"] = True`` (``"keep"``). With a
    ``json_schema``, ``state.parsed(name)`` is the parsed value (a pydantic model's validated instance).
    ``model``: the model that serves this call (a LoRA adapter's name, or a model of the backend, see
    ``plait.lang.models``); None: the innermost ``s.using(model=...)`` scope's, else the backend's default.
    """
    if choices is not None:
        return select(name, choices=choices, choices_method=choices_method, model=model)
    model = check_model_name(model, f"gen {name!r}")
    if choices_method is not None:
        raise ValueError("choices_method only applies with choices=[...]; pass both or use pl.select")
    check_fields({"regex": regex, "ebnf": ebnf, "stop_regex": stop_regex})
    overrides: dict[str, Any] = {
        "max_new_tokens": max_tokens,
        "min_new_tokens": min_tokens,
        "stop": stop,
        "stop_token_ids": stop_token_ids,
        "stop_regex": stop_regex,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "frequency_penalty": frequency_penalty,
        "presence_penalty": presence_penalty,
        "repetition_penalty": repetition_penalty,
        "ignore_eos": ignore_eos,
        "seed": seed,
        "regex": regex,
        "json_schema": _schema_to_json(json_schema) if json_schema is not None else None,
        "ebnf": ebnf,
    }
    if dtype is not None:
        if not isinstance(dtype, type) or dtype not in DTYPE_REGEX:
            raise InvalidDtypeError(
                f"gen dtype must be one of int, float, bool, str, got {dtype!r}; for other shapes use "
                "regex=... or json_schema=..."
            )
        if regex is not None or json_schema is not None or ebnf is not None:
            raise ValueError("gen: dtype is itself a constraint; give dtype or regex/json_schema/ebnf, not both")
        overrides["regex"] = DTYPE_REGEX[dtype]
        if dtype in (int, float):
            overrides["regex"] += NUMBER_END[0]
            stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
            overrides["stop"] = stops + tuple(s for s in NUMBER_END[1] if s not in stops)
    if on_incomplete not in ON_INCOMPLETE:
        raise ValueError(f"gen on_incomplete must be one of {ON_INCOMPLETE}, got {on_incomplete!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for key in ("stop", "stop_regex"):
        if isinstance(overrides.get(key), list):
            overrides[key] = tuple(overrides[key])
    validated = SamplingParams(**overrides)  # raises ValueError naming a bad field
    normalized = tuple(sorted((k, getattr(validated, k)) for k in overrides))
    if name is not None and not isinstance(name, str):
        raise TypeError(f"gen name must be a str or None, got {type(name).__name__}")
    if isinstance(top_logprobs_num, bool) or not isinstance(top_logprobs_num, int) or top_logprobs_num < 0:
        raise ValueError(f"top_logprobs_num must be an int >= 0, got {top_logprobs_num!r}")
    schema_model = json_schema if isinstance(json_schema, type) and hasattr(json_schema, "model_validate_json") else None
    return Gen(
        name, normalized, dtype, bool(return_logprob or top_logprobs_num), top_logprobs_num, schema_model, on_incomplete,
        model=model,
    )


def gen_int(name: str | None = None, max_tokens: int | None = None, **kwargs: Any) -> Node:
    """``gen(name, max_tokens, dtype=int, ...)`` (``max_tokens`` second, as in SGLang)."""
    return gen(name, max_tokens, dtype=int, **kwargs)


def gen_float(name: str | None = None, max_tokens: int | None = None, **kwargs: Any) -> Node:
    """``gen(name, max_tokens, dtype=float, ...)``."""
    return gen(name, max_tokens, dtype=float, **kwargs)


def gen_string(name: str | None = None, max_tokens: int | None = None, **kwargs: Any) -> Node:
    """``gen(name, max_tokens, dtype=str, ...)`` (SGLang's): a quoted JSON string; the variable holds the
    decoded str."""
    return gen(name, max_tokens, dtype=str, **kwargs)


def parse_dtype(text: str, dtype: type) -> Any:
    """Convert generated ``text`` to ``dtype``; raises ValueError when it does not parse.

    The stripped text must match ``DTYPE_REGEX[dtype]`` whole: Python's ``int``/``float`` accept more
    (``"1_000"``, ``"nan"``, ``"inf"``) than a gen of that dtype may produce.
    """
    stripped = text.strip()
    if dtype in (int, float) and re.fullmatch(DTYPE_REGEX[dtype], stripped) is None:
        raise ValueError(f"{text!r} is not a {dtype.__name__}")
    if dtype is bool:
        if stripped not in ("True", "False"):
            raise ValueError(f"{text!r} is not True or False")
        return stripped == "True"
    if dtype is str:
        value = json.loads(stripped)
        if not isinstance(value, str):
            raise ValueError(f"{text!r} is not a quoted string")
        return value
    return dtype(stripped)


def select(
    name: str | None = None,
    choices: Sequence[str] | None = None,
    temperature: float = 0.0,
    choices_method: ChoicesMethod | str | None = None,
    *,
    model: str | None = None,
) -> Node:
    """Append the most likely of ``choices`` (scored by ``choices_method``) and store it in ``name``.

    The arguments are in SGLang's order (``select(name, choices, temperature, choices_method)``).
    Scores are kept in ``s.get_meta_info(name)``. ``temperature`` is accepted for SGLang
    compatibility; only 0 (deterministic choice) is supported. ``model``: the model that scores the
    choices (as in ``gen``; None: the ``s.using`` scope's, else the backend's default).
    """
    if choices is None or isinstance(choices, str) or len(choices) == 0:
        raise EmptyChoicesError(
            f"select {name!r} needs a non-empty list of choices, got {choices!r}; e.g. "
            f"pl.select({name!r}, choices=['yes', 'no'])"
        )
    bad = [c for c in choices if not isinstance(c, str) or not c]
    if bad:
        raise ValueError(f"select {name!r}: every choice must be a non-empty str, got {bad!r}")
    if temperature != 0.0:
        raise ValueError("select supports only temperature=0 (the best-scoring choice); sample with gen(...) instead")
    return Select(name, tuple(choices), resolve_choices_method(choices_method), check_model_name(model, f"select {name!r}"))


def image(expr: Any) -> Node:
    """An image input (SGLang's ``sgl.image(path)``). plait's backends serve text-only models: running a
    program that appends one raises ``BackendCapabilityError`` ("not supported by this model")."""
    return Media("image", expr if isinstance(expr, str) else f"<{type(expr).__name__}>")


def video(path: str, num_frames: int) -> Node:
    """A video input (SGLang's ``sgl.video(path, num_frames)``); refused like ``image`` when run."""
    return Media("video", f"{path} ({num_frames} frames)")


def role(name: str, expr: Any = None) -> Node:
    """A role block around ``expr`` (text, gen, select or a sequence of them); an empty block if None."""
    if name not in ROLES:
        raise RoleError(f"unknown role {name!r}; use one of {', '.join(ROLES)}")
    if expr is None:
        return Seq((RoleBegin(name), RoleEnd(name)))
    return Seq((RoleBegin(name), to_node(expr), RoleEnd(name)))


def system(expr: Any = None, *, tools: Sequence[Any] | None = None) -> Node:
    """A system block: ``s += pl.system("You are terse.")``.

    ``tools=[...]`` (functions, ``@pl.tool`` or ``Tool``) declares tools the model may then call with
    ``pl.call_tools``; the block is rendered in the chat template's own tool format where it has
    one (``expr`` must then be a str or None).
    """
    if tools is not None:
        from plait.lang.tool_primitives import declare_tools

        return declare_tools(tools, expr)
    return role("system", expr)


def user(expr: Any = None) -> Node:
    """A user block: ``s += pl.user("Hi")``."""
    return role("user", expr)


def assistant(expr: Any = None) -> Node:
    """An assistant block: ``s += pl.assistant(pl.gen("answer"))``."""
    return role("assistant", expr)


def system_begin() -> Node:
    return RoleBegin("system")


def system_end() -> Node:
    return RoleEnd("system")


def user_begin() -> Node:
    return RoleBegin("user")


def user_end() -> Node:
    return RoleEnd("user")


def assistant_begin() -> Node:
    return RoleBegin("assistant")


def assistant_end() -> Node:
    return RoleEnd("assistant")
