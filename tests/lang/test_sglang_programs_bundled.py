"""SGLang's own frontend test programs, with ``import sglang as sgl`` changed to ``import plait as sgl``, run by
plait's Runtime on the bundled model.

The programs are ``sglang.test.test_programs`` of the installed sglang (0.5.23). Its source is read from the
installed package and executed with only its import lines changed (``IMPORTS``); nothing of sglang is
imported (importing sglang patches transformers process-wide). The programs run concurrently in one module
fixture (the engine batches them), and each is one test. ``NOT_RUN`` says why the others are not run
(tests/server/test_sglang_frontend_and_load.py runs the same programs through SGLang's own frontend against
``plait serve``); ``test_every_program_is_run_or_excused`` fails when sglang adds a program that is in
neither list.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import inspect
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import plait as pl
from plait.lang import BackendCapabilityError

pytestmark = pytest.mark.model
SGLANG_VERSION = "0.5.23"

# The only lines changed: SGLang's imports become plait's.
IMPORTS = {
    "import sglang as sgl": "import plait as sgl",
    "from sglang.lang.ir import REGEX_FLOAT, REGEX_INT, REGEX_STR": "from plait.lang.ir import REGEX_FLOAT, REGEX_INT, REGEX_STR",
    "from sglang.srt.utils import is_hip": "from tests.lang.test_sglang_programs_bundled import is_hip",
}

RUN = [
    "test_mt_bench", "test_select", "test_expert_answer", "test_tool_use", "test_parallel_encoding", "test_stream",
    "test_stream_logprobs", "test_regex",
]
# Programs that must fail, and how: plait's backends serve text-only models.
FAILS_CLEARLY = {"test_image_qa": (BackendCapabilityError, "image input (example_image.png) is not supported by this model")}
NOT_RUN = {
    "test_decode_json_regex": "needs a stronger model: the 135M model writes the digit 1 until SGLang's default of 128 "
                              "new tokens in each of its three number gens (3 x 128 constrained tokens, ~35 s on a "
                              "2-core CPU, so its int/float checks pass on a runaway value); regex gens with stop "
                              "strings are covered by test_regex here, test_dtype_gen through SGLang's frontend, and "
                              "tests/lang/test_gen_output_bundled.py",
    "test_few_shot_qa": "asserts factual answers (Washington, Tokyo...): needs a stronger model than the bundled 135M one",
    "test_decode_int": "asserts factual answers (24 hours, 365 days): needs a stronger model",
    "test_react": "asserts a factual answer (Finland or the States): needs a stronger model",
    "test_decode_json": "needs a stronger model: it samples at temperature 1 (it sets none), and the 135M model's "
                        "sampled number or string ran past max_new_tokens=64 in 3 of 8 runs, which plait raises as "
                        "GenerationError (SGLang's frontend returns the cut value, and json.loads fails)",
    "test_dtype_gen": "needs a stronger model: it samples at temperature 1, and the 135M model's quoted string ran past "
                      "max_new_tokens=128 in 1 of 8 runs (GenerationError); dtype gens on this model are covered "
                      "greedily by tests/lang/test_gen_output_bundled.py",
    "test_parallel_decoding": "left out for time: its 512-token summary takes about a minute on a 2-core CPU "
                              "(fork and join are covered by test_parallel_encoding and tests/lang/test_fork_*)",
    "test_completion_speculative": "API speculative execution (function(num_api_spec_tokens=...)) is a feature of "
                                   "SGLang's OpenAI backend, and reads its token_usage; not a Runtime feature",
    "test_chat_completion_speculative": "API speculative execution: SGLang's OpenAI backend only",
    "test_gen_min_new_tokens": "imports SGLang's server-side tokenizer utilities and reads sgl.global_config; "
                               "min_tokens is checked by tests/lang/test_primitives_bundled.py",
}


def is_hip() -> bool:
    """SGLang's test helpers ask whether they run on ROCm; plait's Runtime runs here on the CPU."""
    return False


def _source_path() -> Path:
    """The installed ``sglang/test/test_programs.py``, found without importing sglang."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"sglang is not installed (pip install --no-deps sglang=={SGLANG_VERSION}; see README)")
    version = importlib.metadata.version("sglang")
    if version != SGLANG_VERSION:
        pytest.skip(f"sglang {version} is installed; these tests port the {SGLANG_VERSION} programs")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_programs.py"


def _port(source: str) -> tuple[str, set[str]]:
    """``source`` with the lines of ``IMPORTS`` replaced (indentation kept), and which of them were found."""
    lines, found = [], set()
    for line in source.splitlines():
        stripped = line.strip()
        if stripped in IMPORTS:
            line = line[: len(line) - len(line.lstrip())] + IMPORTS[stripped]
            found.add(stripped)
        lines.append(line)
    return "\n".join(lines) + "\n", found


def _sglang_imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "sglang"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sglang":
            found.append(node.module)
    return found


@pytest.fixture(scope="module")
def ported() -> dict:
    """The namespace of the ported module: every ``test_*`` program, bound to plait."""
    path = _source_path()
    source, found = _port(path.read_text())
    tree = ast.parse(source)
    assert found == set(IMPORTS), f"imports of the SGLang programs changed (missing {set(IMPORTS) - found}); update IMPORTS"
    for node in tree.body:  # no sglang import left, except in programs that are not run
        if isinstance(node, ast.FunctionDef) and node.name in NOT_RUN:
            continue
        assert not _sglang_imports(node), f"{getattr(node, 'name', 'module level')} still imports sglang"
    namespace: dict = {"__name__": "sglang_test_programs_on_plait"}
    exec(compile(tree, str(path), "exec"), namespace)  # noqa: S102 - SGLang's own test programs, ported
    return namespace


def _run(program) -> BaseException | None:
    kwargs = {"check_answer": False} if "check_answer" in inspect.signature(program).parameters else {}
    try:
        program(**kwargs)
    except Exception as exc:  # noqa: BLE001 - reported by the program's test
        exc.add_note(traceback.format_exc(limit=6))
        return exc
    return None


@pytest.fixture(scope="module")
def results(ported, shared_runtime) -> dict[str, BaseException | None]:
    """Every program's error (None when it passed); they run concurrently on the shared Runtime."""
    names = RUN + list(FAILS_CLEARLY)
    pl.set_default_backend(shared_runtime)
    try:
        with ThreadPoolExecutor(len(names)) as pool:
            futures = {name: pool.submit(_run, ported[name]) for name in names}
            return {name: future.result() for name, future in futures.items()}
    finally:
        pl.set_default_backend(None)


def test_every_program_is_run_or_excused(ported):
    """A program a newer sglang adds fails here until it is run or its reason is written down."""
    programs = sorted(name for name in ported if name.startswith("test_") and callable(ported[name]))
    assert programs == sorted(RUN + list(FAILS_CLEARLY) + list(NOT_RUN))


@pytest.mark.parametrize("name", RUN)
def test_sglang_program_runs_on_plait(results, name):
    error = results[name]
    assert error is None, f"{name} failed: {error!r}\n" + "\n".join(getattr(error, "__notes__", []))


@pytest.mark.parametrize("name", sorted(FAILS_CLEARLY))
def test_sglang_program_fails_clearly(results, name):
    kind, message = FAILS_CLEARLY[name]
    assert isinstance(results[name], kind) and message in str(results[name]), repr(results[name])
