"""``kvcluster up``: deploy (or complete) kvcluster on an existing Ray cluster. Idempotent."""

from __future__ import annotations

import argparse
import math

from kvcluster.commands.options import (
    add_address_option,
    add_config_option,
    address_from,
    config_from,
)
from kvcluster.errors import InvalidArgument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "up", help="deploy a node actor on every Ray node (run again when nodes join)"
    )
    add_config_option(parser)
    add_address_option(parser)
    parser.add_argument(
        "--wait-nodes", type=int, default=0, metavar="N", help="first wait until N Ray nodes are alive"
    )
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S", help="for --wait-nodes")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.wait_nodes < 0:
        raise InvalidArgument(f"--wait-nodes must be >= 0, got {args.wait_nodes}")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise InvalidArgument(f"--timeout must be a positive number of seconds, got {args.timeout}")
    from kvcluster.deploy import deploy

    config = config_from(args)
    deployment = deploy(
        config, address_from(args, config), wait_nodes=args.wait_nodes, timeout_s=args.timeout
    )
    for node_id, identity in sorted(deployment.identities.items()):
        print(f"{node_id}  epoch {identity.epoch}  model {identity.model_name}  "
              f"block_size {identity.block_size}  hash {identity.hash_algorithm}")
    print(f"kvcluster is up: {len(deployment.nodes)} node(s) in Ray namespace {deployment.namespace}")
    return 0
