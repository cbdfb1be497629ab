"""A ReAct agent with a calculator tool: think, choose an action, act, observe, repeat.

Every step the model writes a thought, then chooses its action with ``select`` (``calculator`` or
``finish``, nothing else), then writes the action's input under a regex: an arithmetic expression
for the calculator, a number for the final answer. The program runs the calculator in Python
(``calculate``: the expression is parsed with ``ast`` and only arithmetic is evaluated, never
``eval``) and appends the result as the observation. Control flow in Python on generated values
(``if s[...] == "finish"``) is what makes this an agent loop. Run: python examples/react_agent.py
"""

from __future__ import annotations

import ast
import operator

import plait as pl
from plait.lang import Backend

# A number as Python writes it (no leading zeros), and numbers joined by + - * /: every expression the
# regex allows is complete and parses, so the calculator always gets arithmetic. Each input ends with
# the newline the examples end it with, so the model ends it where it would.
NUMBER = r"-?(0|[1-9][0-9]{0,6})(\.[0-9]{1,4})?"
NUMBER_REGEX = NUMBER + r"\n"
EXPRESSION_REGEX = NUMBER + r"( [-+*/] " + NUMBER + r"){1,4}\n"
ACTIONS = ["calculator", "finish"]

INSTRUCTIONS = """Answer the question. You can use a calculator.
Each step has a Thought, an Action (calculator or finish) and an Action Input.
The calculator takes an arithmetic expression and returns its value as the Observation.
Always use the calculator before you finish. To answer, use the finish action with the number
from the last Observation as its input.

Question: A box holds 12 eggs. How many eggs are in 7 boxes and 5 loose eggs?
Thought: I will use the calculator for 12 times 7, plus 5.
Action: calculator
Action Input: 12 * 7 + 5
Observation: 89
Thought: The calculator returned 89, so I can finish.
Action: finish
Action Input: 89

Question: What is 345 times 21?
Thought: I will use the calculator for 345 times 21.
Action: calculator
Action Input: 345 * 21
Observation: 7245
Thought: The calculator returned 7245, so I can finish.
Action: finish
Action Input: 7245
"""


class CalculatorError(ValueError):
    """The calculator was given something other than arithmetic on numbers."""


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> float | int:
    """Evaluate ``expression`` (numbers, + - * /, parentheses) without ``eval``.

    Raises ``CalculatorError`` for anything else (names, calls, attributes, powers, ...) and
    ``ZeroDivisionError`` for a division by zero.
    """
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not an arithmetic expression: {expression!r} ({exc.msg})") from None

    def evaluate(node: ast.AST) -> float | int:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](evaluate(node.left), evaluate(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](evaluate(node.operand))
        raise CalculatorError(f"the calculator only does + - * / on numbers, got {ast.unparse(node)!r}")

    return evaluate(tree.body)


def observe(expression: str) -> str:
    """The observation the agent sees for a calculator call (errors included, so it can recover)."""
    try:
        value = calculate(expression)
    except (CalculatorError, ZeroDivisionError) as exc:
        return f"error: {exc}"
    return f"{value:g}" if isinstance(value, float) else str(value)


@pl.function
def react_agent(s, question, max_steps=3):
    s += INSTRUCTIONS + f"\nQuestion: {question}\n"
    for step in range(max_steps):
        s += "Thought:" + pl.gen(f"thought_{step}", max_tokens=32, stop="\n") + "\n"
        s += "Action: " + pl.select(f"action_{step}", choices=ACTIONS) + "\n"
        if s[f"action_{step}"] == "finish":
            break
        s += "Action Input: " + pl.gen(f"input_{step}", max_tokens=32, regex=EXPRESSION_REGEX)
        s += f"Observation: {observe(s[f'input_{step}'])}\n"
    else:  # out of steps: make it answer
        s += "Action: finish\n"
    s += "Action Input: " + pl.gen("answer", max_tokens=16, regex=NUMBER_REGEX)


QUESTIONS = [
    ("A shop sells pens at 3 dollars each. How much do 14 pens and a 25 dollar bag cost?", 14 * 3 + 25),
    ("What is 1234 times 56?", 1234 * 56),
]


def main(backend: Backend) -> None:
    """Run the agent on ``QUESTIONS`` (concurrently) on ``backend`` and print each trajectory."""
    pl.set_default_backend(backend)
    states = react_agent.run_batch([{"question": q} for q, _ in QUESTIONS], temperature=0)
    for (question, expected), state in zip(QUESTIONS, states):
        print(f"Question: {question}")
        step = 0
        while f"action_{step}" in state:
            print(f"  step {step}: thought:{state[f'thought_{step}']}")
            print(f"          action: {state[f'action_{step}']}")
            if f"input_{step}" in state:
                expression = state[f"input_{step}"].strip()
                print(f"          input: {expression} -> observation: {observe(expression)}")
            step += 1
        answer = float(state["answer"])
        print(f"  answer: {state['answer'].strip()} ({'correct' if answer == expected else f'expected {expected}'})\n")


if __name__ == "__main__":
    with pl.Runtime() as runtime:  # the bundled SmolLM2-135M-Instruct, on the CPU
        main(runtime)
