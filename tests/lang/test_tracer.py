"""prog.trace: the IR graph of a symbolic run, constant parts, and where tracing stops."""

from __future__ import annotations

import pytest

import plait as pl
from plait.lang import MockBackend
from plait.lang.ir import Gen, RoleBegin, RoleEnd, Select
from plait.lang.tracer import ArgRef, ConstText, ForkNode, JoinNode, StopNode, ValueRef


@pl.function
def agent(s, question, n_ideas=2):
    s += pl.system("You are a planner.")
    s += pl.user("Question: " + question)
    s += pl.assistant(pl.gen("plan", max_tokens=32))
    forks = s.fork(n_ideas)
    for i, f in enumerate(forks):
        f += pl.user(f"Idea {i + 1}?")
        f += pl.assistant(pl.gen("idea", max_tokens=16))
    forks.join()
    s += pl.user("Is the plan good?")
    s += pl.assistant(pl.select("verdict", choices=["yes", "no"]))
    s += pl.user("Summarize: " + s["plan"])
    if s["verdict"] == "yes":
        s += pl.assistant(pl.gen("summary"))


def test_trace_graph_with_roles_fork_select_and_stop():
    trace = agent.trace(chat_template="chatml")
    nodes = trace.nodes
    assert nodes[:3] == [RoleBegin("system"), ConstText("You are a planner."), RoleEnd("system")]
    assert nodes[3:6] == [RoleBegin("user"), ConstText("Question: "), ArgRef("question")]
    gen = nodes[8]
    assert isinstance(gen, Gen) and gen.name == "plan" and dict(gen.overrides) == {"max_new_tokens": 32}
    fork = next(n for n in nodes if isinstance(n, ForkNode))
    assert len(fork.branches) == 2
    assert ConstText("Idea 2?") in fork.branches[1]
    assert [n.name for n in fork.branches[0] if isinstance(n, Gen)] == ["idea"]
    assert JoinNode("gather_variable") in nodes
    select = next(n for n in nodes if isinstance(n, Select))
    assert select.choices == ("yes", "no") and select.choices_method.name == "token_length_normalized"
    assert ValueRef("gen", "plan") in nodes  # a generated value reused as text
    assert isinstance(nodes[-1], StopNode) and "select result 'verdict'" in nodes[-1].reason
    assert trace.stopped == nodes[-1].reason
    assert [c.name for c in trace.calls] == ["plan", "idea", "idea", "verdict"]
    assert trace.constant_prefix == "<|im_start|>system\nYou are a planner.<|im_end|>\n<|im_start|>user\nQuestion: "
    assert trace.arguments == {"question": "<symbolic>", "n_ideas": "2 (default)"}


def test_trace_prints_readably():
    text = str(agent.trace(chat_template="chatml"))
    assert text.splitlines()[0] == "trace of agent(question=<symbolic>, n_ideas=2 (default))  [chat template 'chatml']"
    assert "  arg question   <- differs between runs" in text
    assert "  fork 2\n    branch 0:\n      <user>" in text
    assert "STOPPED: control flow depends on the select result 'verdict' (used in __eq__)" in text
    assert "constant prefix (" in text


def test_given_arguments_are_constant_and_change_the_graph():
    one = agent.trace("Why?", n_ideas=1, chat_template="default")
    fork = next(n for n in one.nodes if isinstance(n, ForkNode))
    assert len(fork.branches) == 1
    assert ConstText("Question: Why?") in one.nodes and not any(isinstance(n, ArgRef) for n in one.nodes)
    assert one.constant_prefix == "SYSTEM: You are a planner.\nUSER: Question: Why?\nASSISTANT: "
    assert one.text.endswith("{gen:plan}\n")  # stops before the fork


def test_control_flow_on_an_argument_stops_the_trace():
    @pl.function
    def prog(s, n):
        s += "Header\n"
        for i in range(n):
            s += f"Item {i}\n"

    trace = prog.trace(chat_template="default")
    assert trace.constant_prefix == "Header\n"
    assert "argument 'n' (used in __index__)" in trace.stopped
    assert prog.trace(2, chat_template="default").constant_prefix == "Header\nItem 0\nItem 1\n"


def test_trace_uses_the_backend_template_and_sends_nothing():
    backend = MockBackend(chat_template="llama-3-instruct")
    trace = agent.trace(backend=backend)
    assert trace.template == "llama-3-instruct"
    assert trace.constant_prefix.startswith("<|start_header_id|>system<|end_header_id|>\n\n")
    assert backend.calls == []
    pl.set_default_backend(backend)
    assert agent.trace().template == "llama-3-instruct"


def test_program_exceptions_are_reported_not_raised():
    @pl.function
    def prog(s, x):
        s += "a"
        raise ValueError("unsupported")

    trace = prog.trace(chat_template="default")
    assert trace.stopped == "the program raised ValueError: unsupported" and trace.constant_prefix == "a"


def test_dtype_and_var_scope_in_trace():
    @pl.function
    def prog(s):
        with s.var_scope("block"):
            s += "n=" + pl.gen("n", dtype=int)
        s += s["block"]

    trace = prog.trace(chat_template="default")
    gen = next(n for n in trace.nodes if isinstance(n, Gen))
    assert gen.dtype is int and dict(gen.overrides)["regex"] == r"-?\d+[ \n]*"
    assert ValueRef("scope", "block") in trace.nodes and trace.stopped is None
    assert "dtype=int" in str(trace)


def test_bad_trace_arguments():
    with pytest.raises(pl.lang.ProgramArgumentError):
        agent.trace("a", "b", "c")
