"""``local_cluster`` tears down the Ray nodes it started, whatever fails (a fake ``Cluster``:
no Ray processes)."""

from __future__ import annotations

from typing import Any

import pytest

import kvcluster.local_cluster as local_cluster_module
from kvcluster.local_cluster import start_simulated_nodes


class FakeCluster:
    """Starts a head at construction, as ``ray.cluster_utils.Cluster(initialize_head=True)``."""

    instances: list[FakeCluster] = []

    def __init__(self, **kwargs: Any) -> None:
        self.nodes = 1
        self.shut_down = False
        FakeCluster.instances.append(self)

    def add_node(self, **kwargs: Any) -> None:
        if self.nodes == 2:
            raise RuntimeError("injected: the third node failed to start")
        self.nodes += 1

    def wait_for_nodes(self) -> None:
        pass

    def shutdown(self) -> None:
        self.shut_down = True


def test_nodes_started_before_a_failed_start_are_shut_down(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCluster.instances.clear()
    monkeypatch.setattr(local_cluster_module, "Cluster", FakeCluster)
    with pytest.raises(RuntimeError, match="injected"):
        start_simulated_nodes(3)
    (cluster,) = FakeCluster.instances
    assert cluster.shut_down
