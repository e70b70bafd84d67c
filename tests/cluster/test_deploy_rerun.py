"""``deploy`` run again after nodes join, against a fake of the few Ray calls it makes (no Ray
processes): a refused config must leave the cluster as it was."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import ray

import kvcluster.deploy as deploy_module
from kvcluster.config import KVClusterConfig
from kvcluster.deploy import deploy
from kvcluster.errors import ClusterError, ConfigDrift
from kvcluster.node_types import NodeIdentity, identity_for
from kvcluster.ray_actors import NODE_ACTOR_PREFIX


def make_config(block_size: int = 16, metrics_port: int | None = None) -> KVClusterConfig:
    return KVClusterConfig.from_dict({
        "cache": {"block_size": block_size, "num_blocks": 64},
        "registry": {"backend": "redis", "url": "redis://127.0.0.1:1/0"},
        "cluster": {"ray_namespace": "kvc-fake", "metrics_port": metrics_port},
    })


@dataclass
class FakeActor:
    node_id: str
    ident: NodeIdentity
    port: int | None = None

    @property
    def identity(self) -> Any:
        return SimpleNamespace(remote=lambda: self.ident)

    @property
    def metrics_port(self) -> Any:
        return SimpleNamespace(remote=lambda: self.port)


@dataclass
class FakeRay:
    """Named detached actors by name; ``get_if_exists`` creation as Ray does it."""

    ray_nodes: list[str]
    actors: dict[str, FakeActor] = field(default_factory=dict)

    def nodes(self) -> list[dict[str, Any]]:
        return [{"NodeID": n, "Alive": True} for n in self.ray_nodes]

    failure: BaseException | None = None  # raised by every get, once set

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        if self.failure is not None:
            raise self.failure
        return refs

    def kill(self, actor: FakeActor) -> None:
        self.actors.pop(NODE_ACTOR_PREFIX + actor.node_id, None)

    def get_actor(self, name: str, namespace: str | None = None) -> FakeActor:
        if name not in self.actors:
            raise ValueError(name)
        return self.actors[name]

    def list_named_actors(self, all_namespaces: bool = False) -> list[dict[str, str]]:
        return [{"name": name, "namespace": "kvc-fake"} for name in self.actors]

    def create_node_actor(self, node_id: str, ray_node_id: str, *, namespace: str,
                          max_concurrency: int, init_args: tuple[Any, ...]) -> FakeActor:
        name = NODE_ACTOR_PREFIX + node_id
        if name not in self.actors:
            config = KVClusterConfig.model_validate(init_args[1])
            self.actors[name] = FakeActor(node_id, identity_for(config, node_id, 1), init_args[3])
        return self.actors[name]


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> FakeRay:
    fake = FakeRay(["a" * 20, "c" * 20])
    module = SimpleNamespace(
        is_initialized=lambda: True, nodes=fake.nodes, get=fake.get, kill=fake.kill,
        get_actor=fake.get_actor, util=SimpleNamespace(list_named_actors=fake.list_named_actors),
        exceptions=ray.exceptions,
    )
    monkeypatch.setattr(deploy_module, "ray", module)
    monkeypatch.setattr(deploy_module, "create_node_actor", fake.create_node_actor)
    return fake


def test_a_refused_config_leaves_no_actor_of_it_on_a_node_that_joined(fake_ray: FakeRay) -> None:
    first = deploy(make_config(16))
    assert len(first.nodes) == 2
    fake_ray.ray_nodes.append("b" * 20)  # a node joins; `up` is run again, with a drifted file
    with pytest.raises(ConfigDrift, match="block_size"):
        deploy(make_config(32))
    # The new node must not be left running the refused config...
    assert all(a.ident.block_size == 16 for a in fake_ray.actors.values())
    # ...so that `up` with the cluster's config then completes the deployment.
    again = deploy(make_config(16))
    assert len(again.nodes) == 3


def test_a_node_that_joins_gets_a_metrics_port_no_other_node_has(fake_ray: FakeRay) -> None:
    # Simulated nodes share one host: the exporter of a node that joined must not take the
    # port of one already running (its actor would fail to start: address in use).
    deploy(make_config(metrics_port=9400))
    assert sorted(a.port for a in fake_ray.actors.values()) == [9400, 9401]
    fake_ray.ray_nodes.append("b" * 20)  # sorts between the two
    deploy(make_config(metrics_port=9400))
    ports = [a.port for a in fake_ray.actors.values()]
    assert len(ports) == 3 and len(set(ports)) == 3, ports


@pytest.mark.parametrize(("failure", "message"), [
    (ray.exceptions.GetTimeoutError("timed out"), "did not answer within 7 s"),
    (ray.exceptions.RayActorError(), "failed to start"),
])
def test_an_actor_that_cannot_start_is_a_cluster_error_not_a_hang(
    fake_ray: FakeRay, failure: BaseException, message: str
) -> None:
    fake_ray.failure = failure
    with pytest.raises(ClusterError, match=message):
        deploy(make_config(), timeout_s=7.0)
