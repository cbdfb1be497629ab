"""``benchmarks/ttft_trace.py``: its hooks still name real code, and its bookkeeping of points per request."""

from __future__ import annotations

import importlib
import inspect
import math

from tests.benchmark_scripts import load_benchmark

trace = load_benchmark("ttft_trace")


def test_every_trace_point_names_a_function_that_exists():
    """A renamed method would leave a hop empty; the script reports it at run time, this test first."""
    for module_name, path, label, when in trace.TRACE_POINTS:
        owner = importlib.import_module(module_name)
        for part in path.split("."):
            owner = getattr(owner, part)
        assert callable(owner), (module_name, path)
        if when == "enter_urgent":  # the wrapper reads urgent from the third positional argument
            assert list(inspect.signature(owner).parameters)[:3] == ["self", "item", "urgent"]
    labels = {label for *_, label, _ in trace.TRACE_POINTS} | {"client_send", "client_first", "http_got_first_out"}
    for _, start, end in trace.HOPS:
        assert start in labels and end in labels, (start, end)


def test_points_belong_to_the_request_sent_before_them_and_hops_are_medians():
    sends = [(10.0, 10.020), (20.0, 20.030)]
    points = [(9.0, "http_handler"),  # before the first request: nobody's
              (10.001, "http_handler"), (10.002, "http_submit"), (10.003, "http_submit"),  # a second submit
              (20.001, "http_handler"), (20.004, "http_submit")]
    requests = trace.per_request(sorted(points), sends)
    assert requests[0]["http_handler"] == 10.001 and requests[0]["http_submit"] == 10.002
    assert requests[1]["http_handler"] == 20.001 and requests[1]["http_submit"] == 20.004
    rows = {name: (median, p90, n) for name, median, p90, n in trace.summarize(requests)}
    median, _, n = rows["HTTP handler -> body read"]
    assert n == 0 and math.isnan(median)
    assert rows["client send -> client has it (TTFT)"][2] == 2
    assert abs(rows["client send -> client has it (TTFT)"][0] - 25.0) < 1e-6  # median of 20 and 30 ms


def test_every_burst_point_is_recorded_by_a_hook_or_the_client():
    labels = {label for *_, label, _ in trace.TRACE_POINTS} | {"client_send", "client_first", "http_got_first_out"}
    assert set(trace.BURST_ORDER) <= labels


def test_burst_rows_are_first_median_and_last_after_the_burst_start():
    start = 100.0
    sends = [(100.000, 100.050), (100.001, 100.090), (100.002, None)]  # the third never got text
    points = [(99.0, "http_handler"),  # a warm-up request's, before the burst
              (100.010, "http_handler"), (100.020, "http_handler"), (100.030, "http_handler"),
              (100.040, "step_started")]
    rows = {label: rest for label, *rest in trace.summarize_burst(sorted(points), start, sends)}
    n, first, median, last = rows["http_handler"]
    assert n == 3 and abs(first - 10) < 1e-6 and abs(median - 20) < 1e-6 and abs(last - 30) < 1e-6
    assert rows["step_started"][0] == 1
    assert rows["client_first"][0] == 2 and abs(rows["client_first"][3] - 90) < 1e-6
    assert rows["http_submit"][0] == 0 and math.isnan(rows["http_submit"][2])


def test_step_times_pair_each_start_with_its_end_after_the_burst():
    points = [(0.5, "step_started"), (0.6, "step_ended"),  # before the burst
              (1.0, "step_started"), (1.002, "http_handler"), (1.004, "step_ended"),
              (1.010, "step_started"), (1.011, "step_ended")]
    durations = trace.step_times(points, start=1.0)
    assert len(durations) == 2 and abs(durations[0] - 4) < 1e-6 and abs(durations[1] - 1) < 1e-6
