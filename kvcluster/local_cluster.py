"""A throwaway Ray cluster of simulated nodes on this machine, with kvcluster deployed on it.

    with kvcluster.local_cluster(config) as client:
        ...

Used by ``kvcluster demo``, the examples and the tests. It starts ``cluster.local_nodes`` Ray
nodes (lean settings: no dashboard, small object stores), deploys one node actor per node and
the embedded registry (or uses Redis when the config says so), and tears everything down on
exit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray.cluster_utils import Cluster

from kvcluster.client import KVClient
from kvcluster.config import KVClusterConfig
from kvcluster.connection import connect
from kvcluster.deploy import deploy, undeploy


def start_simulated_nodes(nodes: int) -> Cluster:
    """A Ray cluster of ``nodes`` simulated nodes on this machine."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    system_config = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 100 << 20,
                        "include_dashboard": False, "_system_config": system_config},
    )
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()  # the nodes already started are processes of their own
        raise
    return cluster


@contextmanager
def local_cluster(config: KVClusterConfig, nodes: int | None = None) -> Iterator[KVClient]:
    """Start simulated Ray nodes, deploy kvcluster, yield a client; tear it all down after."""
    cluster = start_simulated_nodes(nodes or config.cluster.local_nodes)
    try:
        ray.init(address=cluster.address, namespace=config.cluster.ray_namespace, log_to_driver=False)
        deploy(config)
        client = connect(config)
        try:
            yield client
        finally:
            client.close()
            undeploy(config.cluster.ray_namespace)
    finally:
        ray.shutdown()
        cluster.shutdown()
