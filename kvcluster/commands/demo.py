"""``kvcluster demo``: a local multi-node cluster storing and routing real K/V.

Starts a Ray cluster of ``cluster.local_nodes`` simulated nodes on this machine (the registry
in a Ray actor, or Redis with ``--redis``), deploys one node actor per node, then replays a
chat workload (shared system prompts, multi-turn conversations) with K/V tensors of the
configured model's exact shape: each request routes, fetches its cached prefix (checked
against the K/V it must equal), and stores the rest. Prints a live view and a final table.
"""

from __future__ import annotations

import argparse
import os

from kvcluster.commands.options import add_config_option


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run a local multi-node cluster on a chat workload")
    add_config_option(parser)
    parser.add_argument("--nodes", type=int, default=None, help="simulated nodes (default: config)")
    parser.add_argument("--conversations", type=int, default=150)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--redis", metavar="URL", help="use this Redis as the registry")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from kvcluster.demo_run import DemoSettings, run_demo

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    settings = DemoSettings(
        config_path=args.config,
        nodes=args.nodes,
        conversations=args.conversations,
        turns=args.turns,
        redis_url=args.redis,
        seed=args.seed,
    )
    return run_demo(settings)

