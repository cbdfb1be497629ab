"""dtype and JSON output on the real bundled model (SmolLM2-135M-Instruct) through ``pl.Runtime``: a
number in plain text ends where the number ends (before the fix ``\\d+`` ran to ``max_tokens``:
``'196919721973197'``), and JSON cut by ``max_tokens`` raises or is flagged by the runtime."""

from __future__ import annotations

import pytest

import plait as pl
from plait.lang.errors import GenerationError
from plait.lang.primitives import DTYPE_REGEX, NUMBER_END

runtime_module = pytest.importorskip("plait.lang.backends.runtime")

pytestmark = pytest.mark.model
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def rt(bundled_model_dir):
    runtime = runtime_module.Runtime(model=str(bundled_model_dir), dtype="float32", max_total_tokens=4096)
    yield runtime
    runtime.shutdown()


def test_int_in_plain_text_ends_with_the_number(rt):
    prompt = "The first man landed on the moon in the year "
    state = pl.function(lambda s: s.__iadd__(prompt + pl.gen("year", dtype=int, max_tokens=16))).run(backend=rt, temperature=0)
    meta = state.get_meta_info("year")
    assert type(state["year"]) is int
    assert meta["finish_reason"]["type"] == "stop" and meta["completion_tokens"] < 16 and meta["incomplete"] is False
    direct = rt.engine.generate(
        prompt, {"temperature": 0.0, "max_new_tokens": 16, "regex": DTYPE_REGEX[int] + NUMBER_END[0], "stop": list(NUMBER_END[1])}
    )
    assert state["year"] == int(direct["text"])
    assert state.text() == prompt + direct["text"]


def test_json_cut_by_max_tokens_raises_or_is_flagged(rt):
    prompt = "A person as JSON: "
    cut = pl.function(lambda s: s.__iadd__(prompt + pl.gen("p", json_schema=PERSON, max_tokens=4)))
    with pytest.raises(GenerationError, match="not valid JSON"):
        cut.run(backend=rt, temperature=0)
    keep = pl.function(lambda s: s.__iadd__(prompt + pl.gen("p", json_schema=PERSON, max_tokens=4, on_incomplete="keep")))
    state = keep.run(backend=rt, temperature=0)
    assert state.get_meta_info("p")["incomplete"] is True
    assert state.get_meta_info("p")["finish_reason"]["type"] == "length"


def test_pydantic_schema_gives_a_validated_object(rt):
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str
        age: int

    prog = pl.function(lambda s: s.__iadd__("A person as JSON: " + pl.gen("p", json_schema=Person, max_tokens=48)))
    state = prog.run(backend=rt, temperature=0)
    person = state.parsed("p")
    assert isinstance(person, Person) and person == Person.model_validate_json(state["p"])
