"""Node-to-node pulls through the client, on in-process nodes: the pages, the source's lease,
and the planner's pull decision."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from kvcluster.client import KVClient
from kvcluster.config import KVClusterConfig, MigrationConfig
from kvcluster.errors import NodeUnavailable
from kvcluster.migration import MigrationPlanner
from kvcluster.node_actor import NodeActor
from kvcluster.node_handles import LocalNodeHandle
from kvcluster.synthetic_kv import SyntheticKV
from routing.router import RouteDecision
from tests.cluster.in_process import SwitchableHandle, in_process_client


class ImportFails(LocalNodeHandle):
    """A node whose imports fail as if it had died mid-transfer."""

    def call(self, method: str, *args: Any) -> Any:
        if method == "import_prefix":
            raise NodeUnavailable(f"node {self.node_id} died")
        return super().call(method, *args)


@pytest.fixture
def kv_model() -> SyntheticKV:
    return SyntheticKV(KVClusterConfig.from_dict({}).model)


def held_on(actor: NodeActor, tokens: np.ndarray) -> tuple[int, torch.Tensor | None]:
    """What ``actor`` itself serves for ``tokens``: matched tokens and their K/V."""
    engine = actor._engine
    reply = engine.lookup(tokens)
    if reply.lease_id is None:
        return 0, None
    try:
        return reply.matched_tokens, engine.fetch(reply.lease_id).to_tensor()
    finally:
        engine.release(reply.lease_id)


def leases(client: KVClient) -> dict[str, int]:
    return {node: stats.leases for node, stats in client.node_stats().items()}


def test_a_pulled_prefix_is_served_bit_exact_by_the_target(kv_model: SyntheticKV) -> None:
    with in_process_client(LocalNodeHandle) as (client, _, actors):
        prompt = np.arange(1000, 1300)  # 18 full blocks and a partial one
        client.store(prompt, kv_model.kv(prompt), node="n0")
        before = client._planner.bandwidth_bytes_per_s
        moved = client.migrate_prefix(prompt, "default", source="n0", target="n2")
        assert (moved.node_id, moved.new_tokens) == ("n2", 300)
        matched, kv = held_on(actors[2], prompt)
        assert matched == 300 and kv is not None and torch.equal(kv, kv_model.kv(prompt))
        assert leases(client) == {"n0": 0, "n1": 0, "n2": 0}  # the export's lease was released
        assert client._planner.bandwidth_bytes_per_s != before  # the transfer was measured
        # The target registers what it received on its publisher's thread (the pull returned
        # before that); once published, routing finds it there too.
        assert actors[2].sync_registry()
        assert "n2" in client.router.route(prompt).scores


def test_pulling_what_the_source_does_not_hold_moves_nothing(kv_model: SyntheticKV) -> None:
    with in_process_client(LocalNodeHandle) as (client, _, _):
        moved = client.migrate_prefix(np.arange(50, 90), "default", source="n0", target="n1")
        assert (moved.cached_tokens, moved.new_tokens) == (0, 0)
        assert leases(client) == {"n0": 0, "n1": 0, "n2": 0}


def test_a_failed_import_still_releases_the_source_pages(kv_model: SyntheticKV) -> None:
    def handle_for(node: NodeActor) -> LocalNodeHandle:
        return ImportFails(node) if node.node_id == "n1" else LocalNodeHandle(node)

    with in_process_client(handle_for) as (client, _, actors):
        prompt = np.arange(2000, 2100)
        client.store(prompt, kv_model.kv(prompt), node="n0")
        with pytest.raises(NodeUnavailable, match="n1 died"):
            client.migrate_prefix(prompt, "default", source="n0", target="n1")
        assert leases(client) == {"n0": 0, "n1": 0, "n2": 0}
        assert held_on(actors[1], prompt)[0] == 0


def test_the_planner_pulls_from_an_overloaded_holder(kv_model: SyntheticKV) -> None:
    with in_process_client(LocalNodeHandle) as (client, _, actors):
        # A fast link and a short minimum, so a 160-token prefix is worth pulling.
        client._planner = MigrationPlanner(client._config.model,
                                           MigrationConfig(initial_bandwidth_gbps=100.0, min_tokens=64))
        prompt = np.arange(3000, 3160)  # 10 full blocks
        client.store(prompt, kv_model.kv(prompt), node="n0")
        overridden = RouteDecision(
            node_id="n1", matched_blocks=0, blocks_per_tier={}, scores={}, reason="n0 overloaded",
            fallback=None, prompt_blocks=10, best_holder="n0", holder_blocks=10, holder_in_flight=500,
        )
        plan = client._maybe_migrate(prompt, "default", overridden)
        assert plan is not None and plan.action == "pull", plan
        matched, kv = held_on(actors[1], prompt)
        assert matched == 160 and kv is not None and torch.equal(kv, kv_model.kv(prompt))
        # No pull when the holder is the chosen node.
        assert client._maybe_migrate(prompt, "default", RouteDecision(
            node_id="n0", matched_blocks=10, blocks_per_tier={"gpu": 10}, scores={}, reason="",
            fallback=None, prompt_blocks=10, best_holder="n0", holder_blocks=10,
        )) is None


class FixedRouter:
    """A router that always answers ``decision`` (the holder passed over for load)."""

    def __init__(self, decision: RouteDecision) -> None:
        self.decision = decision

    def route(self, *args: Any, **kwargs: Any) -> RouteDecision:
        return self.decision


@pytest.mark.parametrize("failing", ["source", "target import"])
def test_a_failed_pull_degrades_to_recompute_on_the_chosen_node(kv_model: SyntheticKV, failing: str) -> None:
    def handle_for(node: NodeActor) -> LocalNodeHandle:
        if failing == "target import" and node.node_id == "n1":
            return ImportFails(node)
        return SwitchableHandle(node)

    with in_process_client(handle_for) as (client, handles, actors):
        client._planner = MigrationPlanner(client._config.model,
                                           MigrationConfig(initial_bandwidth_gbps=100.0, min_tokens=64))
        prompt = np.arange(3000, 3160)
        client.store(prompt, kv_model.kv(prompt), node="n0")
        client._router = FixedRouter(RouteDecision(  # type: ignore[assignment]
            node_id="n1", matched_blocks=0, blocks_per_tier={}, scores={}, reason="n0 overloaded",
            fallback=None, prompt_blocks=10, best_holder="n0", holder_blocks=10, holder_in_flight=500,
        ))
        if failing == "source":
            handles["n0"].down = True  # type: ignore[attr-defined]
        result = client.route_and_lookup(prompt)  # the pull is an optimisation: its failure is not ours
        assert (result.node_id, result.matched_tokens) == ("n1", 0)
        assert result.migration is not None and result.migration.action == "recompute"
        assert "pull failed" in result.migration.reason
        assert [actor._engine.stats().leases for actor in actors] == [0, 0, 0]
