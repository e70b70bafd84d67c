"""Configuration slices for routing: block hashing, the prefix registry and the router."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class HashingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: Literal["xxh3_128", "sha256"] = Field(
        default="xxh3_128",
        description="Block-hash chain algorithm: xxh3_128 (fast) or sha256 (adversarial tenants).",
    )
    salt: str = Field(
        default="", description="Cluster-wide salt mixed into every chain (e.g. a deployment id)."
    )


class RegistryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["memory", "redis"] = Field(
        default="memory",
        description="'memory' (embedded, in-process or in a Ray actor) or 'redis'.",
    )
    url: str | None = Field(
        default=None,
        description="Redis URL (redis:// or rediss:// with TLS; a password goes in the URL).",
    )
    key_prefix: str = Field(default="kvc", description="Prefix of every registry key.")
    entry_ttl_s: float = Field(
        default=3600.0, gt=0, description="Registry entries expire unless refreshed within this."
    )
    heartbeat_interval_s: float = Field(default=2.0, gt=0, description="How often nodes renew liveness.")
    node_ttl_s: float = Field(
        default=6.0, gt=0, description="A node that has not renewed within this drops out of answers."
    )
    socket_timeout_s: float = Field(default=0.5, gt=0, description="Redis socket timeout.")
    index_stride_blocks: int = Field(
        default=16,
        ge=1,
        le=4096,
        description="The registry indexes every n-th block of a chain (the last block of each "
        "group of n) and answers in multiples of n blocks: 16 blocks of 16 tokens = 256-token "
        "granularity keeps a 32K-token lookup to 128 probes. 1 indexes every block (exact).",
    )
    max_buffered_batches: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="How far ahead of a node's last applied batch an out-of-order batch is "
        "buffered (by sequence number) until the gap before it is filled.",
    )

    # One Lua call blocks Redis for its whole run and must answer within socket_timeout_s
    # (0.5 s by default). Measured on redis-server 7.0 (script time from INFO commandstats):
    # 2.6-5 us per op when the ops share a few families (a re-announce: one family per chain),
    # 8-13 us when every op opens its own family, so 4,096 ops run for 10-55 ms: about a tenth
    # of the socket timeout at worst, and no lookup waits behind one batch longer than that.
    # A node with ~1M blocks at stride 16 (62,500 checkpoints) re-announces in 16 batches.
    # The cap of 65,535 is the most families one ops blob can name.
    max_batch_ops: int = Field(
        default=4096,
        ge=1,
        le=65535,
        description="Most registry operations (indexed checkpoints stored, removed or moved) one "
        "published batch carries; more (a node re-announcing everything it holds) go out as "
        "several consecutive batches, so no single Redis Lua call nears socket_timeout_s.",
    )

    @field_validator("key_prefix")
    @classmethod
    def _plain_prefix(cls, value: str) -> str:
        # Braces would change the Redis Cluster hash tag and glob characters the SCAN patterns.
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,32}", value):
            raise ValueError(
                f"key_prefix must be 1-32 letters, digits, '_', '.' or '-', got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> RegistryConfig:
        if self.backend == "redis" and not self.url:
            raise ValueError("registry backend 'redis' needs a url (redis://host:port/db)")
        if self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"registry url must start with redis://, rediss:// or unix://, got {self.url!r}")
        if self.node_ttl_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"node_ttl_s ({self.node_ttl_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s}) or live nodes would flap"
            )
        return self


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tier_weights: dict[Literal["gpu", "cpu", "nvme"], float] = Field(
        default={"gpu": 1.0, "cpu": 0.8, "nvme": 0.5},
        description="Worth of a cached block on each tier relative to GPU, for scoring.",
    )
    load_weight: float = Field(
        default=0.1,
        ge=0,
        description="How strongly in-flight load (relative to the mean) lowers a node's score.",
    )
    imbalance_threshold: float = Field(
        default=4.0,
        ge=1.0,
        description="A node that would exceed this multiple of the mean in-flight load (bounded "
        "loads: ceil(threshold * (total + 1) / nodes)) loses cache affinity.",
    )
    virtual_nodes: int = Field(
        default=64, gt=0, description="Points per node on the consistent-hash ring of the fallback."
    )
    fallback_choices: int = Field(
        default=4,
        ge=1,
        le=16,
        description="With no cached prefix anywhere, take one of this many nodes in the ring "
        "order of the first block: the one this router sent the fewest recent requests, then "
        "the least loaded (1 = plain consistent hashing).",
    )
    placement_half_life_requests: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="With no cached prefix anywhere, the ring choice this router sent the fewest "
        "recent requests goes first; a request's weight in that count halves every this many "
        "requests routed, so a node that joined late or was idle catches up within about as many.",
    )
    free_blocks_weight: float = Field(
        default=0.05,
        ge=0,
        description="How strongly a node's share of free blocks raises its score (a tie-breaker).",
    )
    full_free_fraction: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="With no cached prefix anywhere, a ring choice with less than this share of "
        "free blocks counts as full: among equally loaded choices one with room is preferred, so "
        "a new prefix does not evict cached ones while another node has space.",
    )
    registry_retry_s: float = Field(
        default=1.0,
        gt=0,
        description="After the registry fails, route by affinity for this long before trying it "
        "again (doubling up to registry_retry_max_s while it stays down).",
    )
    registry_retry_max_s: float = Field(
        default=10.0, gt=0, description="Longest wait between two tries of a failed registry."
    )

    @model_validator(mode="after")
    def _check(self) -> RouterConfig:
        if self.registry_retry_max_s < self.registry_retry_s:
            raise ValueError(
                f"registry_retry_max_s ({self.registry_retry_max_s}) must be at least "
                f"registry_retry_s ({self.registry_retry_s})"
            )
        negative = {tier: w for tier, w in self.tier_weights.items() if w < 0}
        if negative:
            raise ValueError(f"tier weights must be >= 0, got {negative}")
        return self
