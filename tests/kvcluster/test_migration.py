"""The migration planner: route to the overloaded holder, pull its pages, or recompute."""

from __future__ import annotations

import pytest

from kvcluster.config import MigrationConfig
from kvcluster.migration import MigrationPlanner
from kvcluster.model_spec import PRESETS

SPEC = PRESETS["llama-3-8b"]  # 128 KiB of K/V per token


def planner(**config: object) -> MigrationPlanner:
    return MigrationPlanner(SPEC, MigrationConfig.model_validate(config))


def test_estimates_follow_the_cost_model() -> None:
    plan = planner(initial_bandwidth_gbps=1.0, request_service_s=0.1, prefill_tflops=50.0).decide(
        holder="a", target="b", prefix_tokens=4096, holder_in_flight=3
    )
    assert plan.route_s == pytest.approx(0.3)
    assert plan.pull_s == pytest.approx(4096 * SPEC.bytes_per_token / 1e9)
    assert plan.recompute_s == pytest.approx(SPEC.prefill_flops(4096) / 50e12)
    assert (plan.holder, plan.target, plan.prefix_tokens) == ("a", "b", 4096)


@pytest.mark.parametrize(
    ("in_flight", "bandwidth_gbps", "expected"),
    [
        (0, 1.0, "route"),  # an idle holder: nothing beats going there
        (40, 10.0, "pull"),  # a queue of 2 s against a fast link
        (40, 0.001, "recompute"),  # a link so slow that prefill wins
    ],
)
def test_the_cheapest_option_wins_and_the_reason_names_it(in_flight: int, bandwidth_gbps: float, expected: str) -> None:
    plan = planner(initial_bandwidth_gbps=bandwidth_gbps).decide(
        holder="a", target="b", prefix_tokens=2048, holder_in_flight=in_flight
    )
    assert plan.action == expected
    assert plan.reason.startswith(f"{expected} is cheapest") and f"{in_flight} in flight on a" in plan.reason


def test_disabled_same_node_and_short_prefixes_never_pull() -> None:
    busy = {"prefix_tokens": 4096, "holder_in_flight": 1000}
    assert planner(enabled=False).decide(holder="a", target="b", **busy).reason == "migration disabled"
    assert planner().decide(holder="a", target="a", **busy).reason == "the holder is the target"
    short = planner(min_tokens=512).decide(holder="a", target="b", prefix_tokens=100, holder_in_flight=1000)
    assert short.action == "recompute" and "below min_tokens 512" in short.reason


def test_measured_transfers_move_the_bandwidth_estimate() -> None:
    plan = planner(initial_bandwidth_gbps=1.0)
    plan.record_transfer(nbytes=3_000_000_000, seconds=1.0)  # 3 GB/s measured
    assert plan.bandwidth_bytes_per_s == pytest.approx(1e9 + 0.3 * 2e9)
    plan.record_transfer(nbytes=0, seconds=1.0)
    plan.record_transfer(nbytes=10, seconds=0.0)
    assert plan.bandwidth_bytes_per_s == pytest.approx(1.6e9)  # empty samples are ignored
