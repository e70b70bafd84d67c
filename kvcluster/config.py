"""The one configuration tree, loaded from YAML and validated into frozen objects.

``load_config(path)`` reads a YAML file; ``KVClusterConfig.from_dict`` validates a mapping.
Unknown keys and bad values are rejected with one line per problem naming the file, the
field's path, the bad value and what is allowed. Each component receives only its own slice
(``config.tiers``, ``config.registry``...), never the root. The environment is read here and
nowhere else (``KVCLUSTER_REDIS_URL`` overrides ``registry.url``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvcluster.errors import ConfigError
from kvcluster.model_spec import PRESETS, ModelSpec
from routing.config import HashingConfig, RegistryConfig, RouterConfig
from tiers.config import TiersConfig

EVICTION_POLICIES = ("lru", "lfu", "reuse", "ttl")


class EvictionConfig(BaseModel):
    """Which cached prefixes a node drops first when its pool is full, and what it keeps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = Field(
        default="lru",
        description="lru, lfu, reuse or ttl, or one of the first three with ttl joined by '+' "
        "(e.g. 'lru+ttl': expired blocks go first, then the least recently used). reuse learns "
        "which requests come back (from the generated length a store reports and whether its "
        "prompt extended a cached prefix) and evicts the least likely first.",
    )
    ttl_s: float | None = Field(
        default=None, gt=0, description="Seconds after its last use that a block expires (ttl)."
    )
    pin_budget_fraction: float = Field(
        default=0.25, ge=0, le=1, description="At most this fraction of the cache may be pinned."
    )
    min_prefix_tokens: int = Field(
        default=0, ge=0, description="Prefixes shorter than this are not cached."
    )
    memory_budget_bytes: int | None = Field(
        default=None, gt=0, description="Evict once cached KV exceeds this many bytes."
    )

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        parts = [p.strip() for p in value.split("+")]
        unknown = [p for p in parts if p not in EVICTION_POLICIES]
        if unknown or not parts:
            raise ValueError(
                f"unknown eviction policy {value!r}; valid policies: {', '.join(EVICTION_POLICIES)}"
                " (or a combination such as 'lru+ttl')"
            )
        orders = [p for p in parts if p != "ttl"]
        if len(orders) > 1:
            raise ValueError(
                f"{' and '.join(orders)} cannot be combined; pick one of lru, lfu and reuse, optionally with ttl"
            )
        return "+".join(parts)

    @model_validator(mode="after")
    def _ttl_given(self) -> EvictionConfig:
        has_ttl = "ttl" in self.policy.split("+")
        if has_ttl and self.ttl_s is None:
            raise ValueError("policy 'ttl' needs ttl_s (seconds, > 0)")
        if not has_ttl and self.ttl_s is not None:
            raise ValueError(
                f"ttl_s is set but policy {self.policy!r} has no ttl; use e.g. '{self.policy}+ttl'"
            )
        return self


class CacheConfig(BaseModel):
    """The paged KV cache of each node: block size, context length, pool size, eviction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(default=16, gt=0, le=4096, description="Tokens per KV block (page).")
    max_context: int = Field(
        default=32768, gt=0, le=131072, description="Longest sequence in tokens (up to 131072)."
    )
    num_blocks: int | None = Field(
        default=None,
        gt=0,
        description="Blocks in the node's pool; by default derived from the GPU tier capacity.",
    )
    eviction: EvictionConfig = Field(
        default_factory=EvictionConfig, description="Eviction policy and budgets of the prefix cache."
    )
    session_idle_ttl_s: float = Field(
        default=1800.0, gt=0, description="A conversation idle this long is closed and unpinned."
    )


class ClusterConfig(BaseModel):
    """The Ray deployment: where the cluster is, the node actors, leases and metrics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ray_address: str | None = Field(
        default=None, description="Existing Ray cluster ('auto', 'ray://host:10001'); none = local."
    )
    ray_namespace: str = Field(default="kvcluster", description="Ray namespace of the node actors.")
    local_nodes: int = Field(
        default=3, gt=0, le=64, description="Simulated nodes of a local cluster (demo, tests)."
    )
    actor_max_concurrency: int = Field(
        default=16, gt=0, description="Concurrent calls per node actor, so lookups never queue "
        "behind migrations.",
    )
    lease_ttl_s: float = Field(default=30.0, gt=0, description="A lease not released expires after this.")
    speculative_lookup: bool = Field(
        default=True, description="The client sends a prompt's lookup to the node its prefix family "
        "went to last while the registry answers; when the router picks another node, that lease "
        "is released at once.",
    )
    affinity_entries: int = Field(
        default=65536, gt=0, description="Prefix families whose last node a client remembers "
        "(for speculative lookups).",
    )
    chain_cache_tokens: int = Field(
        default=1 << 22, ge=0, description="Tokens of recent prompts a client keeps with their "
        "block-hash chains, so a repeated or extended prompt (a chat's next turn) hashes only its "
        "new blocks; 0 = off.",
    )
    prompt_memory_tokens: int = Field(
        default=1 << 21, ge=0, description="Token ids of recent long prompts each node keeps (and "
        "each client remembers sending), so a repeated or extended long prompt crosses the wire as "
        "a reference plus its new ids; 0 = off.",
    )
    prompt_delta_min_tokens: int = Field(
        default=2048, ge=64, description="Prompts at least this long are kept by the node they "
        "are sent to (shorter ones always travel in full: their bytes cost little).",
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="Base port of each node's Prometheus exporter (node i uses port + i); none = off.",
    )


class MigrationConfig(BaseModel):
    """When the best prefix holder is overloaded, whether to pull its blocks elsewhere."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Let the client's planner pull prefixes between nodes.")
    min_tokens: int = Field(
        default=256, ge=0, description="Prefixes shorter than this are recomputed, never pulled."
    )
    prefill_tflops: float = Field(
        default=100.0, gt=0,
        description="Sustained prefill throughput of one node in TFLOP/s (recompute cost model).",
    )
    request_service_s: float = Field(
        default=0.05, gt=0,
        description="Mean time a node spends on one request (queueing cost of an overloaded node).",
    )
    initial_bandwidth_gbps: float = Field(
        default=0.3, gt=0,
        description="Node-to-node bandwidth in GB/s assumed until transfers have been measured.",
    )


class KVClusterConfig(BaseModel):
    """The root of the configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelSpec = Field(
        default_factory=lambda: PRESETS["tiny-llama"],
        description="A preset name (llama-3-8b, ...) or a full spec; with 'preset:' plus "
        "overrides, the preset's fields are the defaults.",
    )
    cache: CacheConfig = Field(
        default_factory=CacheConfig, description="The paged KV cache of each node."
    )
    tiers: TiersConfig = Field(
        default_factory=TiersConfig, description="The GPU, CPU and NVMe storage tiers of each node."
    )
    hashing: HashingConfig = Field(
        default_factory=HashingConfig,
        description="How token blocks are hashed into chains; must be the same on every node.",
    )
    registry: RegistryConfig = Field(
        default_factory=RegistryConfig,
        description="The cluster-wide prefix registry: which node holds which blocks.",
    )
    router: RouterConfig = Field(
        default_factory=RouterConfig,
        description="How a request's node is chosen from cache hits, tiers and load.",
    )
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig, description="The Ray cluster and the node actors on it."
    )
    migration: MigrationConfig = Field(
        default_factory=MigrationConfig,
        description="Pulling cached prefixes between nodes when the best holder is overloaded.",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _preset(cls, value: Any) -> Any:
        if isinstance(value, str):
            key = value.lower()
            if key not in PRESETS:
                raise ValueError(
                    f"unknown model preset {value!r}; allowed: {', '.join(sorted(PRESETS))}"
                )
            return PRESETS[key]
        if isinstance(value, Mapping) and "preset" in value:
            key = str(value["preset"]).lower()
            if key not in PRESETS:
                raise ValueError(
                    f"unknown model preset {value['preset']!r}; allowed: {', '.join(sorted(PRESETS))}"
                )
            overrides = {k: v for k, v in value.items() if k != "preset"}
            return {**PRESETS[key].model_dump(), **overrides}
        return value

    @model_validator(mode="after")
    def _tiers_hold_a_page(self) -> KVClusterConfig:
        # Fractions of free memory are resolved at start (and checked there); absolute sizes
        # can be checked now against the page this model and block size make.
        page = self.model.bytes_per_block(self.cache.block_size)
        tiers = self.tiers
        small = [
            f"tiers.{name}.capacity ({tier.capacity.bytes} bytes)"
            for name, tier in (("gpu", tiers.gpu), ("cpu", tiers.cpu), ("nvme", tiers.nvme))
            if tier.capacity.bytes is not None and tier.capacity.bytes < page
            and (name != "nvme" or tiers.nvme.enabled)
        ]
        if small:
            raise ValueError(
                f"{', '.join(small)} cannot hold one page of {page} bytes "
                f"({self.model.name}, block_size {self.cache.block_size})"
            )
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str = "<config>") -> KVClusterConfig:
        """Validate ``data``; raise :class:`ConfigError` listing every problem."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{source}: the top level must be a mapping of sections, got {type(data).__name__}"
            )
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(
                f"{source}: {exc.error_count()} problem(s) in the configuration",
                [_describe(source, err) for err in exc.errors()],
            ) from None

    def with_env(self, environ: Mapping[str, str]) -> KVClusterConfig:
        """Apply the environment overrides (the only place the environment is read)."""
        url = environ.get("KVCLUSTER_REDIS_URL")
        if not url:
            return self
        try:
            registry = RegistryConfig.model_validate(
                {**self.registry.model_dump(), "backend": "redis", "url": url}
            )
        except ValidationError as exc:
            raise ConfigError(
                f"KVCLUSTER_REDIS_URL: {exc.error_count()} problem(s) in the registry it selects",
                [_describe("KVCLUSTER_REDIS_URL", {**err, "input": url}) for err in exc.errors()],
            ) from None
        return self.model_copy(update={"registry": registry})


def _describe(source: str, err: Mapping[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "<root>"
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        return f"{source}: {path}: unknown key (value {value!r})"
    message = str(err["msg"]).removeprefix("Value error, ")
    if not err["loc"]:  # a check across sections names its values; the input is the whole file
        return f"{source}: {message}"
    return f"{source}: {path}: {message} (got {value!r})"


def load_config(path: str | os.PathLike[str] | None = None, *, apply_env: bool = True) -> KVClusterConfig:
    """Load and validate a YAML configuration file; ``None`` gives the embedded defaults."""
    if path is None:
        config = KVClusterConfig()
    else:
        file = Path(path)
        try:
            text = file.read_text()
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read the configuration file: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from None
        config = KVClusterConfig.from_dict(data, source=str(file))
    return config.with_env(os.environ) if apply_env else config


RegistryBackend = Literal["memory", "redis"]
