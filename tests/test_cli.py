"""Tests for the ``plait`` command line (plait.cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from plait import cli


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PLAIT_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_models_list(tmp_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "WEIGHTS", "CACHED"]
    assert lines[1].split()[:3] == ["smollm2-135m-instruct*", "bundled-gguf", "no"]
    assert any(line.startswith("llama-3.1-8b ") for line in lines)
    assert any(line.startswith("qwen3-8b ") for line in lines)
    assert str(tmp_cache) in out


def test_models_list_json_reports_cached(tmp_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    converted = tmp_cache / "models" / "smollm2-135m-instruct"
    converted.mkdir(parents=True)
    (converted / ".plait-complete").write_text("{}")
    assert cli.main(["models", "list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["smollm2-135m-instruct"]["cached"] is True
    assert rows["smollm2-135m-instruct"]["path"] == str(converted)
    assert rows["qwen3-8b"]["cached"] is False and rows["qwen3-8b"]["weights"] == "dummy"


@pytest.mark.model
def test_models_fetch(bundled_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "fetch", "smollm2-135m-instruct"]) == 0
    assert capsys.readouterr().out.strip() == str(bundled_model_dir)


@pytest.mark.parametrize(
    ("name", "message"),
    [("nope", "unknown preset 'nope'"), ("qwen3-8b", "no downloadable weights")],
)
def test_models_fetch_errors(name: str, message: str, tmp_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "fetch", name]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("plait: error: ") and message in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "models" in capsys.readouterr().err
    assert cli.main(["models"]) == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["models", "fetch"])  # argparse: missing NAME
    assert info.value.code == 2


def test_subcommands_can_be_added(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def add_hello_command(subparsers: argparse._SubParsersAction) -> None:
        hello = subparsers.add_parser("hello")
        hello.add_argument("--name", default="world")
        hello.set_defaults(handler=lambda args: print(f"hello {args.name}") or 0)

    monkeypatch.setattr(cli, "SUBCOMMANDS", [*cli.SUBCOMMANDS, add_hello_command])
    assert cli.main(["hello", "--name", "plait"]) == 0
    assert capsys.readouterr().out == "hello plait\n"
    parser = cli.build_parser()
    assert isinstance(parser.subcommands, argparse._SubParsersAction)


@pytest.mark.parametrize("flag", ["--tp-size", "--tp", "--tensor-parallel-size"])
def test_serve_takes_tensor_parallelism_as_sglang_and_vllm_spell_it(flag: str) -> None:
    args = cli.build_parser().parse_args(["serve", flag, "2"])
    assert cli.engine_settings(args) == {"tp_size": 2}


def test_bench_takes_tensor_parallelism_beside_other_engine_settings() -> None:
    args = cli.build_parser().parse_args(["bench", "--tp", "2", "--engine-arg", "max_total_tokens=64"])
    assert dict(args.engine_args) == {"tp_size": 2, "max_total_tokens": 64}


def test_serve_passes_its_http_settings_to_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from plait.runtime.server import app

    started, exits = [], []
    monkeypatch.setattr(app, "serve", started.append)
    monkeypatch.setattr(cli.os, "_exit", exits.append)  # _serve ends the process once the server stopped
    args = cli.build_parser().parse_args(["serve", "--parse-threads", "16", "--max-n", "8"])
    cli._serve(args)
    (config,) = started
    assert (config.parse_threads, config.max_n) == (16, 8) and exits == [0]
