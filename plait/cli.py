"""The ``plait`` command line.

Each subcommand is registered by an ``add_<name>_command(subparsers)`` function that adds its parser
and sets ``handler`` (a function ``(argparse.Namespace) -> int``) as a default. To add a subcommand
(``serve``, ``bench``, ``generate``), write such a function and append it to ``SUBCOMMANDS``.
Handlers import what they need lazily, so ``plait --help`` stays fast.

Errors the user can fix (unknown model, failed download, bad argument value) print one line to
stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

EXIT_USAGE = 2


def _models_list(args: argparse.Namespace) -> int:
    """``plait models list``: the presets, their weights, and whether they are converted in the cache."""
    from plait.runtime.models.fetch import cache_dir
    from plait.runtime.models.registry import describe_presets

    rows = describe_presets()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(row["name"]) for row in rows) + 2
    print(f"{'NAME':<{width}}{'WEIGHTS':<15}{'CACHED':<8}DESCRIPTION")
    for row in rows:
        cached = ("yes" if row["cached"] else "no") if row["path"] else "-"
        name = row["name"] + ("*" if row["default"] else "")
        print(f"{name:<{width}}{row['weights']:<15}{cached:<8}{row['description']}")
    print(f"\n* default model; cache: {cache_dir()}")
    return 0


def _models_fetch(args: argparse.Namespace) -> int:
    """``plait models fetch NAME``: obtain and convert a preset's weights; prints the directory."""
    from plait.runtime.models.registry import ensure_preset_dir

    print(ensure_preset_dir(args.name))
    return 0


def add_models_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``plait models {list,fetch}``."""
    models = subparsers.add_parser("models", help="list and fetch model presets")
    actions = models.add_subparsers(dest="models_command", metavar="ACTION")
    models.set_defaults(handler=lambda _args: _print_help(models))

    listing = actions.add_parser("list", help="list presets and whether their weights are cached")
    listing.add_argument("--json", action="store_true", help="print machine-readable JSON")
    listing.set_defaults(handler=_models_list)

    fetch = actions.add_parser("fetch", help="download and convert a preset's weights; prints the path")
    fetch.add_argument("name", help="preset name (see `plait models list`)")
    fetch.set_defaults(handler=_models_fetch)


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``plait bench``: the GPU benchmark (same code as ``benchmarks/gpu.py``)."""
    from plait.bench import (  # no torch import: --help stays fast
        ROW_HELP,
        add_arguments,
        run,
    )

    bench = subparsers.add_parser(
        "bench", help="benchmark the card and the engine (Llama-3.1-8B, dummy weights); prints a table",
        description="One run, one table: the card's copy bandwidth and matmul rate, then " + ROW_HELP,
    )
    add_arguments(bench)
    bench.set_defaults(handler=run)


# other spellings of engine settings, as SGLang's and vLLM's servers take them
ENGINE_FLAG_ALIASES = {"tp_size": ("--tp", "--tensor-parallel-size")}
# (nnodes, node_rank and dist_init_addr are SGLang's own flag names already: --nnodes, --node-rank, --dist-init-addr)


def _engine_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per ``EngineConfig`` field (no torch import: the dataclass module is plain)."""
    import dataclasses

    from plait.runtime.config import EngineConfig

    group = parser.add_argument_group("engine settings (plait.runtime.config.EngineConfig; unset: its default)")
    for spec in dataclasses.fields(EngineConfig):
        if spec.name == "model":
            continue
        flag = "--" + spec.name.replace("_", "-")
        aliases = ENGINE_FLAG_ALIASES.get(spec.name, ())
        kind = str(spec.type)
        default = spec.default if spec.default is not dataclasses.MISSING else None
        if "bool" in kind:
            group.add_argument(flag, dest=f"engine.{spec.name}", action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=f"default: {default}")
            continue
        convert = int if kind.startswith("int") else float if kind.startswith("float") else str
        shown = "chosen by the engine (docs)" if default is None else default
        many = {"nargs": "+"} if kind.startswith("tuple") else {}  # lora_paths name=path ..., lora_target_modules
        group.add_argument(flag, *aliases, dest=f"engine.{spec.name}", type=convert, default=argparse.SUPPRESS,
                           metavar=spec.name.upper(), help=f"default: {shown}", **many)


def engine_settings(args: argparse.Namespace) -> dict:
    """The engine settings given on a parsed ``plait serve`` command line (``--flag`` per field above)."""
    return {key.split(".", 1)[1]: value for key, value in vars(args).items() if key.startswith("engine.")}


def _serve(args: argparse.Namespace) -> int:
    """``plait serve``: the HTTP server (SGLang-native and OpenAI-compatible APIs)."""
    if getattr(args, "dp_size", 1) > 1:  # data parallelism: replicas behind the router (plait/router/)
        from plait.router.launcher import serve_data_parallel

        return serve_data_parallel(args)
    try:
        from plait.runtime.server.app import ServerConfig, serve
    except ImportError as exc:
        raise ValueError(f"plait serve needs the server extra: pip install 'plait[server]' ({exc})") from None
    settings = engine_settings(args)
    from plait.runtime.config import EngineConfig

    config = EngineConfig.from_kwargs(model=args.model, **settings)  # bad values fail here, before anything starts
    place = config.rendezvous()
    if place.node_rank > 0:  # another host of a tensor-parallel group: its ranks only; node 0 serves
        return _serve_follower_node(config, place)
    serve(ServerConfig(
        model=args.model, host=args.host, port=args.port, api_key=args.api_key,
        served_model_name=args.served_model_name, log_level=args.log_level,
        shutdown_timeout=args.shutdown_timeout, keep_alive_timeout=args.keep_alive_timeout,
        strict_fields=args.strict_fields, detokenizer=args.detokenizer,
        reasoning_parser=args.reasoning_parser, engine_settings=settings,
        max_body_bytes=args.max_body_bytes, max_json_depth=args.max_json_depth, max_n=args.max_n,
        max_prompt_logprobs=args.max_prompt_logprobs, parse_threads=args.parse_threads,
    ))
    # Drained and shut down (the engine process has exited): skip the interpreter's teardown (thread
    # pools joined, daemonic helper processes terminated, torch unloaded), 1-2 s that only delay the exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve_follower_node(config: object, place: object) -> int:
    """``plait serve --node-rank R`` (R > 0): run this host's tensor-parallel ranks until node 0 stops."""
    from plait.runtime.executor.tensor_parallel import run_node
    from plait.runtime.models.registry import resolve_model

    first = place.global_rank(0)
    print(f"plait serve: node {place.node_rank} of {place.nnodes}: tensor-parallel ranks {first}.."
          f"{first + place.ranks_per_node - 1} of {config.tp_size}, joining node 0 at {place.address} "
          "(node 0 serves the API)", flush=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s plait-node %(levelname)s %(message)s")
    source = resolve_model(config.model, config.load_format, config.tokenizer_path)
    return run_node(config, source)


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``plait serve``."""
    serve = subparsers.add_parser(
        "serve", help="serve a model over HTTP (SGLang-native and OpenAI-compatible APIs)",
        description="Serve a model over HTTP: SGLang's /generate protocol, /v1/completions and "
                    "/v1/chat/completions, /metrics. The engine runs in its own process. SIGTERM drains "
                    "in-flight requests and exits.",
    )
    serve.add_argument("--model", "--model-path", default="smollm2-135m-instruct",
                       help="preset name, Hugging Face directory or .gguf file (default: smollm2-135m-instruct)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=30000, help="port (default: 30000)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    serve.add_argument("--served-model-name", default=None, help="model id in the OpenAI API (default: --model)")
    serve.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--shutdown-timeout", type=float, default=60.0,
                       help="seconds SIGTERM waits for in-flight requests before cutting them off (default: 60)")
    serve.add_argument("--keep-alive-timeout", type=float, default=75.0,
                       help="seconds an idle HTTP keep-alive connection stays open (default: 75, longer than "
                       "clients keep idle pooled connections, so none reuses one the server is closing)")
    serve.add_argument("--detokenizer", default="process", choices=["process", "engine"],
                       help="where streamed text is made: a detokenizer process of its own (default), or the "
                            "engine process's thread (one process fewer; the engine thread pays for it)")
    serve.add_argument("--strict-fields", action="store_true",
                       help="refuse requests with unknown fields (400) instead of ignoring them with a warning "
                            "header (X-Plait-Ignored-Fields)")
    serve.add_argument("--reasoning-parser", default=None, choices=["qwen3", "deepseek-r1", "gpt-oss"],
                       help="separate a reasoning model's reasoning (reasoning_content) from its answer (content) "
                            "in the OpenAI API")
    serve.add_argument("--parse-threads", type=int, default=4,
                       help="worker threads of the HTTP process that parse, check and tokenize request bodies "
                            "over 512 bytes (default: 4)")
    limits = serve.add_argument_group("request limits (past them a request gets a 4xx that names the limit)")
    limits.add_argument("--max-body-bytes", type=int, default=16 * 2**20,
                        help="largest request body in bytes; larger ones get 413 (default: 16777216, 16 MiB)")
    limits.add_argument("--max-json-depth", type=int, default=64,
                        help="deepest nesting of arrays/objects in a request body (default: 64)")
    limits.add_argument("--max-n", type=int, default=128, help="most samples per prompt, n (default: 128)")
    limits.add_argument("--max-prompt-logprobs", type=int, default=100_000,
                        help="most prompt logprob entries per request: prompt positions x top logprobs "
                             "(default: 100000)")
    from plait.router.cli import add_data_parallel_arguments  # --dp N and the router's --router-* flags

    add_data_parallel_arguments(serve)
    _engine_setting_arguments(serve)
    serve.set_defaults(handler=_serve)


def add_router_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``plait router`` (its flags are in ``plait/router/cli.py``)."""
    from plait.router.cli import add_router_command as register

    register(subparsers)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_models_command, add_bench_command, add_serve_command, add_router_command,
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand in ``SUBCOMMANDS`` registered.

    The subparsers object is kept as ``parser.subcommands`` so callers may register more.
    """
    from plait import __version__

    parser = argparse.ArgumentParser(
        prog="plait", description="plait: structured generation for LLMs, and the runtime that serves it."
    )
    parser.add_argument("--version", action="version", version=f"plait {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    parser.set_defaults(handler=lambda _args: _print_help(parser))
    parser.subcommands = subparsers  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``plait`` console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from plait.runtime.models.errors import ModelLoadError

    try:
        return int(args.handler(args) or 0)
    except (ModelLoadError, ValueError, OSError) as exc:  # OSError covers ModelNotFoundError
        print(f"plait: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("plait: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
