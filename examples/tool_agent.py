"""A tool-calling agent: Python functions as tools, calls the model cannot get wrong, results fed back.

The tools are plain functions with type hints and docstrings (``@pl.tool`` derives each one's JSON
schema). ``pl.system(..., tools=[...])`` declares them in the model's own chat-template format (or a
readable fallback when the template has no tool support, as with the bundled SmolLM2), and
``pl.call_tools`` lets the model call them: every turn is generated under a grammar that allows either
a text answer or calls whose arguments match the tools' schemas. The program runs the calls (an
exception becomes an "Error: ..." result the model can react to), appends the results as tool turns
and lets the model continue, until it answers or ``max_steps`` turns have called tools.
Run: python examples/tool_agent.py
"""

from __future__ import annotations

from typing import Literal

import plait as pl
from plait.lang import Backend

WEATHER = {"paris": (18.0, "cloudy"), "tokyo": (24.5, "sunny"), "oslo": (3.0, "snow")}


@pl.tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Get the current weather in a city.

    Args:
        city: The city's name, e.g. "Paris".
        unit: The temperature unit.
    """
    key = city.strip().lower()
    if key not in WEATHER:
        raise ValueError(f"no weather data for {city!r}; known cities: {', '.join(c.title() for c in WEATHER)}")
    celsius, sky = WEATHER[key]
    temperature = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32, 1)
    return {"city": city, "temperature": temperature, "unit": unit, "sky": sky}


@pl.tool
def compare(a: float, b: float) -> str:
    """Say which of two numbers is larger.

    Args:
        a: The first number.
        b: The second number.
    """
    return "equal" if a == b else ("a is larger" if a > b else "b is larger")


@pl.function
def weather_agent(s, question, max_steps=3):
    s += pl.system("You answer questions about the weather. Look it up with the tools, then answer in a sentence.",
                   tools=[get_weather, compare])
    s += pl.user(question)
    # The first turn must call a tool (a 135M model rarely decides to on its own); later turns choose.
    s += pl.call_tools("answer", tool_choice="required", parallel=False, max_steps=max_steps, max_tokens=64)


QUESTIONS = ["What is the weather in Paris?", "Is it warmer in Tokyo or in Oslo?"]


def main(backend: Backend) -> None:
    """Run the agent on ``QUESTIONS`` (concurrently) on ``backend`` and print every call and answer."""
    pl.set_default_backend(backend)
    states = weather_agent.run_batch([{"question": q} for q in QUESTIONS], temperature=0)
    for question, state in zip(QUESTIONS, states):
        print(f"Question: {question}")
        for result in state.get_meta_info("answer")["tool_results"]:
            print(f"  call: {result.call.name}({result.call.arguments}) -> {result.content}")
        print(f"  answer: {state['answer'].strip()}\n")


if __name__ == "__main__":
    with pl.Runtime() as runtime:  # the bundled SmolLM2-135M-Instruct, on the CPU
        main(runtime)
