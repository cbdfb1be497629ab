"""The notebooks: saved without outputs, and executed headless (nbclient + ipykernel) on the bundled model.

Each notebook runs in its own process and kernel (one model load each; the three at once); a cell that
raises fails the test with the cell's traceback. The checks read the executed outputs: the state's HTML
view (heat map, select scores, fork branches, totals), the trace, the structure of every constrained
output, and stderr (no TqdmWarning anywhere).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ["quickstart", "structured_output", "tools"]


def read(name: str):
    return nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_valid_and_without_outputs(name):
    nb = read(name)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: cell {cell.id} was saved with outputs"


_EXECUTE = """
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": sys.argv[3]}}).execute()
nbformat.write(nb, sys.argv[2])
"""


@pytest.fixture(scope="module")
def executed(bundled_model_dir, tmp_path_factory):
    """Execute every notebook (all at once, each in its own process and kernel: most of a notebook's
    time is its kernel starting and loading the model, which overlap) and return a function giving
    {cell id: (stdout text, html text, stderr text)} of one of them; a notebook whose cell raised fails
    its test with the cell's traceback."""
    out_dir = tmp_path_factory.mktemp("notebooks")
    runs = {name: subprocess.Popen([sys.executable, "-c", _EXECUTE, str(NOTEBOOKS_DIR / f"{name}.ipynb"),
                                    str(out_dir / f"{name}.ipynb"), str(NOTEBOOKS_DIR)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name in NOTEBOOKS}
    logs = {name: run.communicate(timeout=600)[0] for name, run in runs.items()}

    def run(name: str) -> dict[str, tuple[str, str, str]]:
        assert runs[name].returncode == 0, f"{name} failed:\n{logs[name][-4000:]}"
        nb = nbformat.read(out_dir / f"{name}.ipynb", as_version=4)
        return {cell.id: _outputs(cell) for cell in nb.cells if cell.cell_type == "code"}

    return run


def _outputs(cell) -> tuple[str, str, str]:
    text, html, err = [], [], []
    for out in cell.outputs:
        if out.output_type == "stream":
            (text if out.name == "stdout" else err).append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            html.append(out.data.get("text/html", ""))
            text.append(out.data.get("text/plain", ""))
    return "".join(text), "".join(html), "".join(err)


def _assert_state_view(html: str) -> None:
    assert html.count('class="plait-msg"') >= 2  # one box per role block
    assert '<span class="plait-gen" title="gen ' in html  # generated text highlighted, named
    assert "cached tokens" in html and "border:1px solid" in html  # the calls table, with borders
    assert re.search(r'<div class="plait-totals">\d+ calls? \u00b7 \d+ prompt tokens, \d+ cached \(\d+%\)', html)


def _assert_no_tqdm_warning(cells) -> None:
    for cell_id, (_, _, err) in cells.items():
        assert "TqdmWarning" not in err and "IProgress not found" not in err, f"cell {cell_id}: {err}"


@pytest.mark.model
def test_quickstart_notebook(executed):
    cells = executed("quickstart")
    answers = cells["quick-03"][0].strip().splitlines()
    assert len(answers) == 2 and "Paris" in answers[0]
    view = cells["quick-05"][1]
    _assert_state_view(view)
    tokens = re.findall(r'<span class="plait-tok" style="background:hsl\((\d+),80%,80%\)" title="p=([\d.]+)  logprob=', view)
    assert len(tokens) >= 4  # return_logprob=True: the answers are heat maps, a span per token
    assert all(abs(int(hue) - 120 * float(p)) <= 1 for hue, p in tokens)
    trace = cells["quick-07"][0]
    assert trace.startswith("trace of chat(question_1=<symbolic>, question_2=<symbolic>)")
    assert "arg question_1   <- differs between runs" in trace and "constant prefix (" in trace
    label, scores = cells["quick-09"][0].split(" ", 1)
    assert label in ("positive", "negative") and len(json.loads(scores)) == 2
    chips = re.findall(r'<span class="plait-choice( plait-chosen)?" title="[^"]*">(?:\u2713 )?(\w+) (-?[\d.]+)</span>', cells["quick-09-view"][1])
    assert [(bool(chosen), choice) for chosen, choice, _ in chips] == [(label == "positive", "positive"), (label == "negative", "negative")]
    assert [float(score) for _, _, score in chips] == [round(x, 3) for x in json.loads(scores)]
    assert len(re.findall(r"^- .+$", cells["quick-11"][0], re.MULTILINE)) == 3  # three forked branches joined
    fork_view = cells["quick-11-view"][1]
    assert "fork: 3 branches, joined (gather_variable)" in fork_view
    assert len(re.findall(r"<summary>branch \d: joined \(gather_variable\), 1 call, \d+ output tokens</summary>", fork_view)) == 3
    rows = re.findall(r"^(\w+): (.*)  \((\d+) of (\d+) prompt tokens cached\)$", cells["quick-13"][0], re.MULTILINE)
    assert [r[0] for r in rows] == ["France", "Spain", "Egypt", "Canada"]
    assert all(0 < int(cached) < int(prompt) for _, _, cached, prompt in rows)
    assert "capital: 100%" in cells["quick-13"][2] and "4/4" in cells["quick-13"][2]  # run_batch's progress bar
    _assert_no_tqdm_warning(cells)


@pytest.mark.model
def test_structured_output_notebook(executed):
    cells = executed("structured_output")
    ip, legs, year, flat = re.fullmatch(r"'(.*)' '(.*)' (-?\d+) (True|False)\n.*\n", cells["struc-03"][0], re.DOTALL).groups()
    assert re.fullmatch(r"(\d{1,3}\.){3}\d{1,3}", ip) and all(0 <= int(p) <= 255 for p in ip.split("."))
    assert re.fullmatch(r"[0-9]{1,3} legs", legs)
    assert "the year is an int" in cells["struc-03"][0] and int(year) >= 0 and flat in ("True", "False")
    _assert_state_view(cells["struc-04"][1])
    document, finish = cells["struc-06"][0].rsplit("\nfinish: ", 1)
    book = json.loads(document)
    assert set(book) == {"title", "author", "year", "genres"} and 1400 <= book["year"] <= 2030
    assert finish.startswith("stop")
    characters = re.findall(r"^Character\(name='.*', role='(\w+)', strength=(\d+)\)$", cells["struc-08"][0], re.MULTILINE)
    assert len(characters) == 2 and all(r in ("hero", "villain", "sidekick") and 1 <= int(s) <= 10 for r, s in characters)
    sections = re.findall(r" -> (\w+)$", cells["struc-10"][0], re.MULTILINE)
    assert len(sections) == 2 and set(sections) <= {"sports", "politics", "science", "business"}
    assert cells["struc-12"][0].startswith("InvalidDtypeError - ")
    _assert_no_tqdm_warning(cells)


@pytest.mark.model
def test_tools_notebook(executed):
    cells = executed("tools")
    schema = json.loads(cells["tools-03"][0])
    assert schema["required"] == ["city"] and schema["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]
    calls = re.findall(r"^get_weather (\{.*\}) -> (.*)$", cells["tools-05"][0], re.MULTILINE)
    assert calls  # the first turn must call the tool; its arguments are valid for the schema
    for arguments, result in calls:
        assert set(json.loads(arguments)) <= {"city", "unit"} and "city" in json.loads(arguments)
        assert result.startswith("{") or result.startswith("Error: ValueError: no weather data")
    _assert_state_view(cells["tools-06"][1])
    assert "&lt;tool_response&gt;" in cells["tools-06"][1]  # the tool turn is part of the conversation
    names, roles = cells["tools-08"][0].strip().splitlines()
    assert names == "['get_weather']"
    assert roles.startswith("['system', 'user', 'assistant', 'tool', 'assistant'")
    _assert_no_tqdm_warning(cells)
