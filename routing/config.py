"""Configuration slices for routing: block hashing, the prefix registry and the router."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
        default=0.5, ge=0, description="How strongly in-flight load lowers a node's score."
    )
    imbalance_threshold: float = Field(
        default=1.5,
        ge=1.0,
        description="A node whose load exceeds this multiple of the mean loses cache affinity.",
    )
    virtual_nodes: int = Field(
        default=64, gt=0, description="Points per node on the consistent-hash ring of the fallback."
    )
