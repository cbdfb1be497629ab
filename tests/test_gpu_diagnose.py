"""benchmarks/gpu_diagnose.py's trace reading (the GPU runs themselves are measured on the GPU machine)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.benchmark_scripts import load_benchmark


def _launch(correlation: int, ts: float, name: str = "cudaLaunchKernel") -> dict:
    category = "cuda_driver" if name.startswith("cu") and not name.startswith("cuda") else "cuda_runtime"
    return {"cat": category, "name": name, "ts": ts, "dur": 5, "args": {"correlation": correlation}}


def _kernel(correlation: int, ts: float, dur: float, name: str) -> dict:
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def test_idle_gaps_tell_a_late_host_from_a_queued_wait(tmp_path):
    """Two steps: before kernel b the host launched it only after a had ended (host late, 40 us a
    step); kernel c was launched long before (through the driver API, as Triton launches) and still waited
    30 us (queued); d follows at once."""
    events = []
    for step in range(2):
        t = step * 1000
        events += [
            _launch(10 * step + 1, t, "cudaGraphLaunch"), _kernel(10 * step + 1, t + 10, 100, "a"),
            _launch(10 * step + 2, t + 140), _kernel(10 * step + 2, t + 150, 10, "b"),
            _launch(10 * step + 3, t + 20, "cuLaunchKernelEx"), _kernel(10 * step + 3, t + 190, 10, "c"),
            _launch(10 * step + 4, t + 25), _kernel(10 * step + 4, t + 201, 10, "d"),
        ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    report = load_benchmark("gpu_diagnose").idle_gaps(str(trace), steps=2)
    lines = report.splitlines()
    assert "host late 0." in lines[0] and "queued 0." in lines[0]
    rows = {}
    for line in lines[2:]:
        head, name, api = (part.strip() for part in line.split("/"))
        us, _, *kind = head.split()
        rows[" ".join(kind), name] = (float(us), api)
    # per step: b 40 us after a (host late), c 30 us after b (queued); d's 1 us is no gap; a 799 us after
    # the step before's d (host late, launched by the graph launch), counted once in two steps
    assert rows["host late", "b"] == (40.0, "cudaLaunchKernel") and rows["queued", "c"] == (30.0, "cuLaunchKernelEx")
    assert rows["host late", "a"] == (399.5, "cudaGraphLaunch") and ("queued", "d") not in rows
    # a profiler run's own trace (written to a scratch file) gives the same report
    exported = []

    class FinishedRun:
        def export_chrome_trace(self, path: str) -> None:
            exported.append(path)
            with open(path, "w") as out:
                out.write(trace.read_text())

    assert load_benchmark("gpu_diagnose").trace_idle_gaps(FinishedRun(), steps=2) == report
    assert len(exported) == 1 and not Path(exported[0]).exists()  # the scratch file is gone
