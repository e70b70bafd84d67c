"""Options several subcommands share: the configuration file and the Ray address."""

from __future__ import annotations

import argparse

from kvcluster.config import KVClusterConfig, load_config


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="YAML configuration (default: the embedded defaults)"
    )


def add_address_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster address ('auto', 'host:port', 'ray://host:10001'); "
        "default: cluster.ray_address from the config",
    )


def config_from(args: argparse.Namespace) -> KVClusterConfig:
    return load_config(args.config)


def address_from(args: argparse.Namespace, config: KVClusterConfig) -> str | None:
    return args.address or config.cluster.ray_address
