"""``kvcluster status``: nodes, tiers, occupancy and hit rates, read from each node's metrics."""

from __future__ import annotations

import argparse
import json

from kvcluster.commands.options import (
    add_address_option,
    add_config_option,
    address_from,
    config_from,
)
from kvcluster.errors import InvalidArgument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("status", help="show the nodes, their tiers and hit rates")
    add_config_option(parser)
    add_address_option(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--min-nodes", type=int, default=1, metavar="N",
        help="exit 1 unless at least N nodes answer (for health checks)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.min_nodes < 0:
        raise InvalidArgument(f"--min-nodes must be >= 0, got {args.min_nodes}")
    from kvcluster.deploy import ensure_ray
    from kvcluster.node_status import collect_status, render_status

    config = config_from(args)
    ensure_ray(address_from(args, config), config.cluster.ray_namespace)
    status = collect_status(config.cluster.ray_namespace)
    if args.json:
        print(json.dumps([row.as_dict() for row in status], indent=2))
    else:
        print(render_status(status))
    answering = sum(1 for row in status if row.error is None)
    return 0 if answering >= args.min_nodes else 1
