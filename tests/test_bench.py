"""Tests for the GPU benchmark (plait.bench, ``plait bench``, ``benchmarks/gpu.py``), run on the CPU.

The end-to-end test runs every row with ``--quick`` on the bundled SmolLM2-135M config (dummy weights,
a small KV cache) in about 20-30 s on two cores, and checks the printed table and the --out file.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from plait import bench, cli
from tests.benchmark_scripts import load_benchmark

QUICK_ROWS = {
    "card": ["copy bandwidth", "matmul 512^3"],
    "a": ["decode, batch 1, prompt 16, N=8"],
    "b": [f"decode, batch {b}, prompt {p}, N=8" for p in (16, 64) for b in (1, 2, 4)],
    "c": ["offline total tok/s, 8 requests x 16 in / 8 out", "offline output tok/s, 8 requests x 16 in / 8 out"],
    "d": ["shared prefix, cache on: total tok/s, 2 groups x 4", "shared prefix, cache off: total tok/s, 2 groups x 4",
          "shared prefix: cache on / cache off throughput"],
    "e": ["transformers generate, batch 1, prompt 16, N=8", "transformers generate, batch 2, prompt 16, N=8"],
    "f": ["time to first token, prompt 64 (median of 3)"],
}


def table_rows(text: str) -> dict[str, list[list[str]]]:
    """Markdown table rows of the report, grouped by their first cell (header and rule skipped)."""
    rows: dict[str, list[list[str]]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("row", "---"):
            rows.setdefault(cells[0], []).append(cells)
    return rows


@pytest.mark.model
@pytest.mark.slow
def test_quick_run_prints_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results" / "gpu.md"
    start = time.perf_counter()
    status = cli.main(["bench", "--quick", "--model", "smollm2-135m-instruct", "--engine-arg", "kv_cache_gb=0.05",
                       "--out", str(out)])
    elapsed = time.perf_counter() - start
    assert status == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    assert printed.startswith("# plait benchmark: CPU ")
    rows = table_rows(printed)
    assert set(rows) == set(QUICK_ROWS), printed
    for key, names in QUICK_ROWS.items():
        assert len(rows[key]) == len(names), rows[key]
        for cells, name in zip(rows[key], names):
            assert name in cells[1], (name, cells)
            assert not cells[2].startswith(("failed", "skipped")), cells
    for key in "abcef":  # throughput and latency rows stand next to a floor
        assert all(cells[3] and float(cells[4]) > 0 for cells in rows[key]), rows[key]
    assert "at most 8 running" in rows["c"][0][5]  # the quick row c's 8 requests fit at once
    hit_rate = float(rows["d"][0][5].split("hit rate ")[1].split()[0])
    assert hit_rate == pytest.approx(2 * 3 * 64 / (8 * 72), abs=1e-3)  # every prompt but the first of each group hits
    assert "Row e: transformers" in printed and "shared, not copied" in printed
    assert elapsed < 120, f"the quick run took {elapsed:.0f} s (about 25 s expected on two idle cores)"


@pytest.mark.model
def test_only_runs_the_selected_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--quick", "--model", "smollm2-135m-instruct", "--engine-arg", "kv_cache_gb=0.02",
                     "--only", "a"]) == 0
    assert set(table_rows(capsys.readouterr().out)) == {"card", "a"}


def test_missing_transformers_is_a_skipped_row(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from plait.bench.gpu import QUICK
    from plait.bench.hf_reference import hf_decode_rows

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError("no transformers here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    rows = hf_decode_rows(None, {}, None, None, None, QUICK, {}, 0, [])
    assert [r.result for r in rows] == ["skipped: transformers is not installed"] * 2


def test_llama_8b_floors_match_the_performance_model() -> None:
    """DESIGN.md: ~15 GB of weights read per step, 128 KiB of KV per token, ~14 GFLOP per prefill token."""
    import torch

    from plait.bench.gpu import Machine, ModelFacts
    from plait.runtime.models.config import ModelConfig
    from plait.runtime.models.registry import preset_config

    engine = SimpleNamespace(
        model_config=ModelConfig.from_hf(preset_config("llama-3.1-8b")),
        runner=SimpleNamespace(dtype=torch.bfloat16, kv_dtype=lambda: torch.bfloat16),
        config=SimpleNamespace(max_running_requests=256),
    )
    facts = ModelFacts.from_engine(engine)
    assert facts.weight_bytes == pytest.approx(15.0e9, rel=0.01)
    assert facts.kv_bytes_per_token == 128 * 1024
    engine.runner.kv_dtype = lambda: torch.float8_e4m3fn  # an FP8 KV cache: a byte an element
    assert ModelFacts.from_engine(engine).kv_bytes_per_token == 64 * 1024
    assert 2 * facts.gemm_params == pytest.approx(14.0e9, rel=0.01)
    h100 = Machine(torch.device("cpu"), "H100", bandwidth=3.0e12, matmul_rate=700e12, matmul_dtype=torch.bfloat16,
                   matmul_n=8192)
    step, bound = facts.decode_step(h100, 1, 128 + 128)
    assert bound == "memory" and step == pytest.approx(5.0e-3, rel=0.02)  # about 4.5 ms at 3.35 TB/s
    assert facts.decode_step(h100, 4096, 128)[1] == "compute"
    assert facts.prefill_flops(1024) / h100.matmul_rate == pytest.approx(1024 / 50e3, rel=0.1)  # ~50k tok/s


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--only", "a,z"], "--only takes"), (["--engine-arg", "noequals"], "--engine-arg takes KEY=VALUE")],
)
def test_bad_options_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_unknown_engine_setting_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--engine-arg", "no_such_setting=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plait: error: --engine-arg: unknown setting(s) ['no_such_setting']")


def test_engine_arg_values_are_json_or_text() -> None:
    assert bench.parse_engine_arg("attention_backend=triton") == ("attention_backend", "triton")
    assert bench.parse_engine_arg("max_total_tokens=4096") == ("max_total_tokens", 4096)
    assert bench.parse_engine_arg("disable_radix_cache=true") == ("disable_radix_cache", True)
    assert bench.parse_only("b, a,b") == ("b", "a")


def test_benchmarks_gpu_py_is_a_thin_wrapper() -> None:
    module = load_benchmark("gpu")
    assert module.main is bench.main and module.run is bench.run


@pytest.mark.parametrize("preset", ["llama-3.1-8b", "qwen3-8b"])
def test_every_transformers_parameter_maps_to_a_plait_tensor(preset: str) -> None:
    """Row e's weight sharing, checked on the meta device (no memory) for the 8B configs."""
    import torch

    transformers = pytest.importorskip("transformers")
    from plait.bench.hf_reference import plait_tensor_for
    from plait.runtime.layers.attention import TorchAttentionBackend
    from plait.runtime.models.config import ModelConfig
    from plait.runtime.models.llama import LlamaForCausalLM
    from plait.runtime.models.registry import preset_config

    hf_config = preset_config(preset)
    with torch.device("meta"):
        model = LlamaForCausalLM(ModelConfig.from_hf(hf_config), TorchAttentionBackend(), 16)
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf_config))
    params = dict(model.named_parameters())
    for name, param in hf.named_parameters(remove_duplicate=False):
        assert plait_tensor_for(name, model, params).shape == param.shape, name


def _facts_of_preset(name: str, quantization: str | None = "keep"):
    import torch

    from plait.bench.model_facts import ModelFacts
    from plait.runtime.models.config import ModelConfig
    from plait.runtime.models.registry import preset_config

    cfg = ModelConfig.from_hf(preset_config(name))
    if quantization != "keep":
        cfg = cfg.with_quantization(quantization)
    engine = SimpleNamespace(
        model_config=cfg, runner=SimpleNamespace(dtype=torch.bfloat16, kv_dtype=lambda: torch.bfloat16),
        config=SimpleNamespace(max_running_requests=256),
    )
    return ModelFacts.from_engine(engine)


def test_gpt_oss_120b_floor_reads_the_routed_experts_only() -> None:
    """GPT-OSS-120B, MXFP4 experts: a batch-1 step reads the dense weights and 4 of 128 experts per layer
    (~5.1B active parameters); a large batch reads nearly every expert (~61 GB)."""
    from plait.bench.model_facts import expected_distinct_experts

    facts = _facts_of_preset("gpt-oss-120b")
    assert facts.is_moe and (facts.moe_layers, facts.num_experts, facts.top_k) == (36, 128, 4)
    # one expert: 3 * 2880 * 2880 values at 4.25 bits, plus bf16 biases
    assert facts.expert_bytes == int(3 * 2880 * 2880 * 17 / 32) + (2 * 2880 + 2880) * 2
    # dense: attention 36 * 26.5M + routers + embedding-sized head 579M, in bf16: ~3.1 GB; experts 36 * 4 * 13.2 MB
    assert facts.dense_weight_bytes == pytest.approx(2 * (36 * (2880 * 5120 + 4096 * 2880 + 128 * 2880) + 201088 * 2880),
                                                     rel=0.02)
    assert facts.weight_bytes == pytest.approx(facts.dense_weight_bytes + 36 * 4 * facts.expert_bytes, rel=1e-6)
    assert facts.step_weight_bytes(4096) == pytest.approx(facts.dense_weight_bytes + 36 * 128 * facts.expert_bytes,
                                                          rel=1e-6)
    assert expected_distinct_experts(128, 4, 1) == pytest.approx(4)
    assert expected_distinct_experts(128, 4, 64) == pytest.approx(128 * (1 - (124 / 128) ** 64))
    # per token: attention 26.5M + router + 4 experts of 24.9M per layer: ~4.55B multiplied parameters
    assert facts.gemm_params == pytest.approx(36 * (2880 * 5120 + 4096 * 2880 + 128 * 2880 + 4 * 3 * 2880**2), rel=0.02)
    # half the layers slide over 128 keys: a long context reads about half the KV of full attention
    assert facts.kv_read_tokens(4096) == 18 * 4096 + 18 * 128
    assert facts.attention_flops(10, cached=200) == pytest.approx(
        4 * facts.layer_attn_width * (18 * 10 * (200 + 5.5) + 18 * 10 * 128))


def test_dense_model_facts_are_unchanged_by_the_moe_terms() -> None:
    facts = _facts_of_preset("llama-3.1-8b")
    assert not facts.is_moe and facts.step_weight_bytes(256) == facts.weight_bytes
    assert facts.attention_flops(100) == pytest.approx(4 * 32 * 4096 * 100 * 101 / 2)


def test_offline_lengths_option(capsys: pytest.CaptureFixture[str]) -> None:
    from plait.bench import parse_lengths

    assert parse_lengths("1024,512") == (1024, 512)
    with pytest.raises(SystemExit):
        cli.main(["bench", "--offline-lengths", "1024"])
    assert "--offline-lengths takes IN,OUT" in capsys.readouterr().err
