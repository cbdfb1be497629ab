"""``benchmarks/lora_serving.py``: its random adapters are what the engine reads, and a small run on the
bundled model measures the base and each adapter count."""

from __future__ import annotations

import json
import math

import pytest

from tests.benchmark_scripts import load_benchmark

bench = load_benchmark("lora_serving")


def test_random_adapter_is_a_peft_adapter_of_the_given_shapes(tmp_path):
    from plait.runtime.lora import read_adapter

    shapes = {"q_proj": (8, 12), "down_proj": (20, 8)}
    path = bench.write_random_adapter(tmp_path / "a", shapes, num_layers=2, rank=4)
    adapter = read_adapter(str(path))
    assert adapter.rank == 4 and math.isclose(adapter.scaling, 2.0)
    config = json.loads((path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj"]


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        bench.parse_args(["--adapters", "0,8"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--output-len", "1"])
    args = bench.parse_args(["--engine-arg", "max_total_tokens=4096", "--engine-arg", "dtype=float32"])
    assert dict(args.engine_arg) == {"max_total_tokens": 4096, "dtype": "float32"}


def test_a_small_run_measures_the_base_and_every_adapter_count(tmp_path, bundled_model_dir):
    out = tmp_path / "rows.json"
    assert bench.main(["--batches", "3", "--adapters", "1,2,8", "--rank", "4", "--input-len", "8",
                       "--output-len", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["batch"], r["adapters"]) for r in rows] == [(3, 0), (3, 1), (3, 2)]  # 8 > the batch: skipped
    assert rows[0]["ratio_to_base"] == 1.0 and all(r["decode_tok_s"] > 0 for r in rows)
