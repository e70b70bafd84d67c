"""Cross-node migration planning: route to the holder, pull its blocks, or recompute.

When the node holding the longest prefix is overloaded, the router sends the request to a
less-loaded node. The planner then decides, per request, what that node should do about the
prefix it lacks, by estimated time to first token of each option:

- ``route``: go to the holder anyway: wait ``holder_in_flight * request_service_s``;
- ``pull``: copy the holder's pages to the chosen node: ``bytes / bandwidth`` (bandwidth is
  measured from earlier pulls, an exponential moving average seeded from the config);
- ``recompute``: prefill the prefix on the chosen node: ``prefill_flops / prefill_tflops``.

Every decision carries its estimates and the reason, and is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from kvcluster.config import MigrationConfig
from kvcluster.model_spec import ModelSpec

logger = logging.getLogger(__name__)

Action = Literal["route", "pull", "recompute"]


@dataclass(frozen=True, slots=True)
class MigrationDecision:
    action: Action
    holder: str
    target: str
    prefix_tokens: int
    route_s: float
    pull_s: float
    recompute_s: float
    reason: str


class MigrationPlanner:
    """Chooses among route / pull / recompute. Thread-safe for ``decide`` (pure), and
    ``record_transfer`` is a single float update (benign races only skew the average)."""

    def __init__(self, spec: ModelSpec, config: MigrationConfig, smoothing: float = 0.3) -> None:
        self._spec = spec
        self._config = config
        self._smoothing = smoothing
        self._bandwidth = config.initial_bandwidth_gbps * 1e9

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self._bandwidth

    def record_transfer(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        measured = nbytes / seconds
        self._bandwidth += self._smoothing * (measured - self._bandwidth)

    def decide(self, *, holder: str, target: str, prefix_tokens: int, holder_in_flight: int) -> MigrationDecision:
        config = self._config
        route_s = holder_in_flight * config.request_service_s
        pull_s = prefix_tokens * self._spec.bytes_per_token / self._bandwidth
        recompute_s = self._spec.prefill_flops(prefix_tokens) / (config.prefill_tflops * 1e12)
        if not config.enabled or holder == target:
            action: Action = "route"
            reason = "migration disabled" if not config.enabled else "the holder is the target"
        elif prefix_tokens < config.min_tokens:
            action = "recompute"
            reason = f"prefix of {prefix_tokens} tokens is below min_tokens {config.min_tokens}"
        else:
            options: dict[Action, float] = {"route": route_s, "pull": pull_s, "recompute": recompute_s}
            action = min(options, key=options.__getitem__)
            reason = (
                f"{action} is cheapest: route {route_s * 1e3:.2f} ms ({holder_in_flight} in flight "
                f"on {holder}), pull {pull_s * 1e3:.2f} ms at {self._bandwidth / 1e9:.2f} GB/s, "
                f"recompute {recompute_s * 1e3:.2f} ms"
            )
        decision = MigrationDecision(action, holder, target, prefix_tokens, route_s, pull_s, recompute_s, reason)
        logger.info("migration plan %s -> %s: %s", holder, target, reason)
        return decision
