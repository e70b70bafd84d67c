"""``kvcluster down``: stop every node actor and the embedded registry."""

from __future__ import annotations

import argparse

from kvcluster.commands.options import (
    add_address_option,
    add_config_option,
    address_from,
    config_from,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("down", help="stop the node actors and the embedded registry")
    add_config_option(parser)
    add_address_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from kvcluster.deploy import ensure_ray, undeploy

    config = config_from(args)
    ensure_ray(address_from(args, config), config.cluster.ray_namespace)
    print(f"stopped {undeploy(config.cluster.ray_namespace)} actor(s)")
    return 0
