"""Command-line flags of ``plait router`` and of ``plait serve --dp N`` (registered by ``plait.cli``).

No heavy imports here: ``plait --help`` stays fast.
"""

from __future__ import annotations

import argparse

POLICY_CHOICES = ("cache_aware", "round_robin", "random")  # plait.router.policy.POLICIES


def add_router_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``plait router``."""
    router = subparsers.add_parser(
        "router", help="route requests over running `plait serve` replicas (data parallelism)",
        description="An HTTP endpoint in front of `plait serve` replicas on any hosts: each request goes to "
                    "the replica most likely to hold its prefix in cache, or the least loaded one once the "
                    "load is imbalanced; all requests of one program_id go to one replica. Native and "
                    "OpenAI APIs pass through unchanged, streams included. SIGTERM drains and exits.",
    )
    router.add_argument("--replica", dest="replicas", action="append", default=[], metavar="URL",
                        help="a replica's base URL (http://host:port); repeat for each replica")
    router.add_argument("--worker-urls", dest="replicas", nargs="+", action="extend", metavar="URL",
                        help="the replicas' URLs, as SGLang's router spells it")
    router.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    router.add_argument("--port", type=int, default=30000, help="port (default: 30000)")
    router.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' from clients")
    router.add_argument("--replica-api-key", default=None, help="the key sent to the replicas (default: the "
                        "client's own Authorization header is passed on)")
    router.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    router.add_argument("--shutdown-timeout", type=float, default=60.0,
                        help="seconds SIGTERM waits for in-flight requests (default: 60)")
    add_routing_arguments(router, prefix="")
    limits = router.add_argument_group("request limits")
    limits.add_argument("--max-body-bytes", type=int, default=16 * 2**20,
                        help="largest request body in bytes; larger ones get 413 (default: 16 MiB)")
    limits.add_argument("--max-json-depth", type=int, default=64, help="deepest JSON nesting (default: 64)")
    limits.add_argument("--request-timeout", type=float, default=None,
                        help="seconds a replica may take to answer before a 504 (default: no limit)")
    router.set_defaults(handler=_run_router)


def add_routing_arguments(parser: argparse.ArgumentParser, prefix: str) -> None:
    """The routing policy's flags (``--policy`` ...; with ``prefix="router-"`` for ``plait serve --dp``)."""
    group = parser.add_argument_group("routing")
    group.add_argument(f"--{prefix}policy", dest="router_policy", default="cache_aware", choices=POLICY_CHOICES,
                       help="cache_aware (default: longest cached prefix, least load past the balance "
                            "thresholds), round_robin or random")
    group.add_argument(f"--{prefix}cache-threshold", dest="router_cache_threshold", type=float, default=0.5,
                       help="share of a request's text a replica must have seen for a cache hit (default: 0.5)")
    group.add_argument(f"--{prefix}balance-abs-threshold", dest="router_balance_abs_threshold", type=int,
                       default=32, help="in-flight difference past which the load counts as imbalanced "
                                        "(default: 32)")
    group.add_argument(f"--{prefix}balance-rel-threshold", dest="router_balance_rel_threshold", type=float,
                       default=1.0001, help="... and busiest / idlest ratio past which (default: 1.0001)")
    group.add_argument(f"--{prefix}max-tree-size", dest="router_max_tree_size", type=int, default=2**22,
                       help="characters kept in each replica's prefix tree (default: 4194304)")
    group.add_argument(f"--{prefix}max-match-chars", dest="router_max_match_chars", type=int, default=8192,
                       help="characters of each request's text used for routing (default: 8192)")
    group.add_argument(f"--{prefix}health-check-interval", dest="router_health_check_interval", type=float,
                       default=5.0, help="seconds between health checks of the replicas (default: 5)")


def routing_settings(args: argparse.Namespace) -> dict:
    """The ``RouterConfig`` fields set by ``add_routing_arguments``' flags."""
    return {name[len("router_"):]: value for name, value in vars(args).items() if name.startswith("router_")}


def _run_router(args: argparse.Namespace) -> int:
    from plait.router.app import RouterConfig, run_router

    run_router(RouterConfig(
        replicas=tuple(args.replicas), host=args.host, port=args.port, api_key=args.api_key,
        replica_api_key=args.replica_api_key, log_level=args.log_level, shutdown_timeout=args.shutdown_timeout,
        max_body_bytes=args.max_body_bytes, max_json_depth=args.max_json_depth,
        request_timeout=args.request_timeout, **routing_settings(args)))
    return 0


def add_data_parallel_arguments(serve: argparse.ArgumentParser) -> None:
    """``plait serve --dp N`` (and the router's flags as ``--router-...``)."""
    serve.add_argument("--dp", "--dp-size", "--data-parallel-size", dest="dp_size", type=int, default=1,
                       metavar="N", help="data parallelism: N replicas (replica i on GPU i, times --tp) behind "
                                         "a cache-aware router on --host/--port (default: 1)")
    add_routing_arguments(serve, prefix="router-")


DATA_PARALLEL_DESTS = frozenset({"dp_size", "router_policy", "router_cache_threshold",
                                 "router_balance_abs_threshold", "router_balance_rel_threshold",
                                 "router_max_tree_size", "router_max_match_chars",
                                 "router_health_check_interval"})
