"""Few-shot prompting in a batch: one program, many questions, one shared prefix computed once.

``run_batch`` traces the program, finds the text every run starts with (the instructions and the
five worked examples: ``few_shot_qa.batch_prefix(items)``), prefills it once into the prefix cache and
then runs the programs concurrently; each run only computes its own question. The cached-token
counts printed per run show it. Run: python examples/few_shot_batch.py
"""

from __future__ import annotations

import plait as pl
from plait.lang import Backend

SHOTS = [
    ("What is the capital of France?", "Paris"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest ocean on Earth?", "The Pacific Ocean"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ("What is the boiling point of water at sea level in Celsius?", "100 degrees"),
]

QUESTIONS = [
    "What is the capital of Italy?",
    "Which animal is known as the king of the jungle?",
    "What is the chemical symbol for gold?",
    "How many legs does a spider have?",
    "What is the tallest mountain in the world?",
    "Which language is spoken in Brazil?",
]


@pl.function
def few_shot_qa(s, question):
    s += "Answer each question in a few words.\n\n"
    for shot_question, shot_answer in SHOTS:
        s += f"Q: {shot_question}\nA: {shot_answer}\n\n"
    s += f"Q: {question}\nA:" + pl.gen("answer", max_tokens=12, stop="\n")


def main(backend: Backend) -> None:
    """Answer ``QUESTIONS`` in one ``run_batch`` on ``backend`` and print answers and cache use."""
    pl.set_default_backend(backend)
    items = [{"question": q} for q in QUESTIONS]
    prefix = few_shot_qa.batch_prefix(items)
    print(f"shared prefix: {len(prefix)} characters ({len(SHOTS)} examples), prefilled once")
    states = few_shot_qa.run_batch(items, temperature=0)
    for item, state in zip(items, states):
        (call,) = state.calls
        print(f"Q: {item['question']}\nA: {state['answer'].strip()}"
              f"   [{call.cached_tokens} of {call.prompt_tokens} prompt tokens cached]")


if __name__ == "__main__":
    with pl.Runtime() as runtime:  # the bundled SmolLM2-135M-Instruct, on the CPU
        main(runtime)
