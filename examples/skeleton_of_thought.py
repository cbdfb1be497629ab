"""Skeleton of thought: outline first, expand every point in parallel (fork), then join.

The model writes a three-point skeleton (the program numbers the lines, each point is one line and
its own variable); the program then forks three branches that continue from the skeleton, each
expanding one point, and runs them concurrently. Every branch starts from the same prompt, which
is cached once before they fan out. ``join()`` gathers the branches' expansions into a list; a last
turn writes the summary.
Run: python examples/skeleton_of_thought.py
"""

from __future__ import annotations

import plait as pl
from plait.lang import Backend

NUM_POINTS = 3


@pl.function
def skeleton_of_thought(s, question):
    s += pl.system("You are a helpful assistant. Be brief.")
    s += pl.user(f"{question}\nFirst list {NUM_POINTS} key points, one short line each.")
    with s.assistant():  # the skeleton: numbered lines, each point in its own variable
        for i in range(1, NUM_POINTS + 1):
            s += f"{i}." + pl.gen(f"point_{i}", max_tokens=20, stop="\n") + "\n"
    branches = s.fork(NUM_POINTS)
    for i, branch in enumerate(branches):
        point = s[f"point_{i + 1}"]  # used only in string building, so tracing sees through it
        branch += pl.user(f"In one sentence, explain how this helps:{point}")
        branch += pl.assistant("It helps because" + pl.gen("expansion", max_tokens=40, stop="\n"))
    branches.join()  # s["expansion"] is now the list of the branches' expansions, in order
    details = "\n".join(f"{i + 1}. It helps because{text}" for i, text in enumerate(s["expansion"]))
    s += pl.user(f"The points in detail:\n{details}\nNow answer the question in one sentence.")
    s += pl.assistant("In short," + pl.gen("summary", max_tokens=40, stop="\n"))


def main(backend: Backend) -> None:
    """Answer one question with skeleton-of-thought on ``backend`` and print each stage."""
    pl.set_default_backend(backend)
    state = skeleton_of_thought.run(question="How can I sleep better?", temperature=0)
    print("Skeleton:")
    for i in range(1, NUM_POINTS + 1):
        print(f"{i}. {state[f'point_{i}'].strip()}")
    for i, expansion in enumerate(state["expansion"]):
        print(f"\nPoint {i + 1} expanded (branch {i}):\nIt helps because{expansion}")
    print("\nSummary:\nIn short," + state["summary"])


if __name__ == "__main__":
    with pl.Runtime() as runtime:  # the bundled SmolLM2-135M-Instruct, on the CPU
        main(runtime)
