"""dtype and JSON output: numbers end where a number ends; cut, unparsable or invalid output raises
``GenerationError`` (or is kept and flagged with ``on_incomplete="keep"``); pydantic schemas give a
validated object through ``state.parsed``."""

from __future__ import annotations

import json

import pytest

import plait as pl
from plait.lang.backends.mock import MockBackend
from plait.lang.errors import GenerationError


def run(body, backend, **kwargs):
    return pl.function(body).run(backend=backend, **kwargs)


def gen_call(backend):
    return backend.calls_of("generate")[-1]


@pytest.mark.parametrize(("dtype", "output", "value"), [(int, "1969 was the year", 1969), (float, "2.5\nThen", 2.5)])
def test_number_ends_at_space_or_newline(dtype, output, value):
    # the mock plays a model in plain text that keeps writing after the number
    backend = MockBackend(default=output, enforce_constraints=False)
    state = run(lambda s: s.__iadd__("Year: " + pl.gen("n", dtype=dtype, max_tokens=64)), backend)
    assert state["n"] == value and type(state["n"]) is dtype
    assert state.text() == f"Year: {output.split()[0]}"
    params = gen_call(backend).params
    assert " " in params.stop and "\n" in params.stop
    assert params.regex.endswith(r"[ \n]*")


def test_number_stop_keeps_the_callers_stops():
    backend = MockBackend(default="7;8")
    state = run(lambda s: s.__iadd__(pl.gen("n", dtype=int, stop=";")), backend)
    assert state["n"] == 7
    assert gen_call(backend).params.stop == (";", " ", "\n")


def test_number_cut_by_max_tokens_raises():
    # "19691" parses, but a number cut by max_tokens may lack its last digits: it is not returned
    with pytest.raises(GenerationError, match=r"'19691', which is incomplete.*'length'"):
        run(lambda s: s.__iadd__(pl.gen("n", dtype=int, max_tokens=1)), _LengthCut("19691"))
    state = run(lambda s: s.__iadd__(pl.gen("n", dtype=int, max_tokens=1, on_incomplete="keep")), _LengthCut("19691"))
    assert state["n"] == "19691" and state.get_meta_info("n")["incomplete"] is True


class _LengthCut(MockBackend):
    """A backend whose every generation is cut by max_tokens after ``text``."""

    def __init__(self, text: str, **kwargs) -> None:
        super().__init__(default=text, enforce_constraints=False, **kwargs)

    def generate(self, call):
        result = super().generate(call)
        result.finish_reason = {"type": "length", "length": call.params.max_new_tokens}
        return result


@pytest.mark.parametrize("text", ["nan", "inf", "1_000", "1e5x"])
def test_values_python_accepts_but_the_dtype_does_not(text):
    backend = MockBackend(default=text, enforce_constraints=False)
    dtype = int if text == "1_000" else float
    with pytest.raises(GenerationError, match="which is not a"):
        run(lambda s: s.__iadd__(pl.gen("x", dtype=dtype)), backend)


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}


def test_json_cut_by_max_tokens_raises():
    backend = MockBackend(default='{"name": "Ada", "age": 36}')
    with pytest.raises(GenerationError, match=r"not valid JSON.*'length'"):
        run(lambda s: s.__iadd__(pl.gen("j", json_schema=SCHEMA, max_tokens=2)), backend)


def test_json_cut_kept_and_flagged_when_asked():
    backend = MockBackend(default='{"name": "Ada", "age": 36}')
    state = run(lambda s: s.__iadd__(pl.gen("j", json_schema=SCHEMA, max_tokens=2, on_incomplete="keep")), backend)
    assert state["j"] == '{"name": "Ada",'
    assert state.get_meta_info("j")["incomplete"] is True
    with pytest.raises(ValueError, match="no parsed value"):
        state.parsed("j")


def test_json_flagged_incomplete_by_the_backend_raises():
    class Flagging(MockBackend):
        def generate(self, call):
            result = super().generate(call)
            result.meta["incomplete"] = True  # as the runtime reports a grammar that is not complete
            return result

    with pytest.raises(GenerationError, match="incomplete"):
        run(lambda s: s.__iadd__(pl.gen("j", json_schema=SCHEMA)), Flagging(default='{"name": "Ada"}'))


def test_json_reported_invalid_under_a_relaxed_schema_raises():
    class Invalid(MockBackend):
        def generate(self, call):
            result = super().generate(call)
            # as the runtime reports a relaxed schema whose every attempt failed validation
            result.meta.update(schema_relaxed=["not"], schema_attempts=3, schema_valid=False, schema_error="at /: nope")
            return result

    with pytest.raises(GenerationError, match="does not validate against its schema.*nope"):
        run(lambda s: s.__iadd__(pl.gen("j", json_schema=SCHEMA)), Invalid(default='{"name": "Ada"}'))
    state = run(lambda s: s.__iadd__(pl.gen("j", json_schema=SCHEMA, on_incomplete="keep")), Invalid(default='{"name": "Ada"}'))
    meta = state.get_meta_info("j")
    assert state["j"] == '{"name": "Ada"}' and meta["incomplete"] is True and meta["schema_valid"] is False


def test_complete_json_is_parsed():
    backend = MockBackend(default='{"name": "Ada", "age": 36}')
    state = run(lambda s: s.__iadd__(pl.gen("j", json_schema=SCHEMA)), backend)
    assert state["j"] == '{"name": "Ada", "age": 36}'
    assert state.parsed("j") == {"name": "Ada", "age": 36}
    assert state.get_meta_info("j")["incomplete"] is False


def test_pydantic_schema_gives_a_validated_object():
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str
        age: int

    state = run(lambda s: s.__iadd__(pl.gen("p", json_schema=Person)), MockBackend(default='{"name": "Ada", "age": 36}'))
    person = state.parsed("p")
    assert isinstance(person, Person) and person == Person(name="Ada", age=36)
    # valid JSON that does not validate (an unconstrained backend) is an error, not a silent string
    bad = MockBackend(default='{"name": "Ada", "age": "old"}')
    with pytest.raises(GenerationError, match="not valid JSON for the schema"):
        run(lambda s: s.__iadd__(pl.gen("p", json_schema=Person)), bad)


def test_on_incomplete_is_validated():
    with pytest.raises(ValueError, match="on_incomplete"):
        pl.gen("x", dtype=int, on_incomplete="ignore")
    assert json.loads(dict(pl.gen("j", json_schema=SCHEMA, on_incomplete="keep").overrides)["json_schema"]) == SCHEMA
