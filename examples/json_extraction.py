"""JSON extraction into a pydantic model: ``gen(json_schema=Model)``.

The model's JSON schema constrains decoding, so every completed output parses and validates:
``Model.model_validate_json`` cannot fail on it. ``extra="forbid"`` closes the object (no properties
beyond the declared ones) and the length and range bounds keep each field short, so the output
always completes within ``max_tokens``. The texts are extracted concurrently with ``run_batch``.
Needs pydantic (``pip install pydantic``). Run: python examples/json_extraction.py
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

import plait as pl
from plait.lang import Backend


class Person(BaseModel):
    """What we extract from a short biography."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=40)
    age: int = Field(ge=0, le=120)
    city: str = Field(min_length=1, max_length=40)
    occupation: str = Field(min_length=1, max_length=40)
    employment: Literal["employed", "self-employed", "student", "retired"]


TEXTS = [
    "Maria Lopez is a 34-year-old architect who lives in Madrid and works for a large design firm.",
    "Born in 1950, Tom Becker retired from teaching last year; he still lives in Hamburg. He is 74.",
    "Aiko Tanaka, 21, studies physics at the university in Kyoto.",
]


@pl.function
def extract_person(s, text):
    s += pl.system("You extract facts from text into JSON.")
    s += pl.user(f"Text: {text}\nExtract the person's name, age, city, occupation and employment.")
    s += pl.assistant(pl.gen("person", max_tokens=96, json_schema=Person))


def main(backend: Backend) -> None:
    """Extract a ``Person`` from each of ``TEXTS`` on ``backend`` and print them."""
    pl.set_default_backend(backend)
    states = extract_person.run_batch([{"text": t} for t in TEXTS], temperature=0)
    for text, state in zip(TEXTS, states):
        person = Person.model_validate_json(state["person"])  # valid by construction
        print(f"text:   {text}\nPerson: {person!r}\n")


if __name__ == "__main__":
    with pl.Runtime() as runtime:  # the bundled SmolLM2-135M-Instruct, on the CPU
        main(runtime)
