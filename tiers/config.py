"""Configuration slice for the tiers: capacities, watermarks, NVMe paths, I/O threads.

This is the part of the YAML under ``tiers:``. It is validated at load (unknown keys rejected)
into frozen objects; the root loader in ``kvcluster.config`` composes it.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_PERCENT_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*$")


def parse_byte_size(value: int | float | str) -> int:
    """Bytes from ``1073741824``, ``"1GiB"``, ``"512 MiB"`` or ``"2GB"``. Rejects negatives."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size in bytes, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value!r}")
        return int(value)
    if not isinstance(value, str):  # null, a list, a mapping: not a size (a ValueError names it)
        raise ValueError(f"expected a size such as 4GiB, 512MiB or 1000000, got {value!r}")
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"expected a size such as 4GiB, 512MiB or 1000000, got {value!r}")
    number, unit = float(match.group(1)), match.group(2).lower() or "b"
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit {match.group(2)!r}; allowed: {', '.join(_UNITS)}")
    return int(number * _UNITS[unit])


class Capacity(BaseModel):
    """A tier's capacity: absolute bytes, or a fraction of the medium's free memory at start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bytes: int | None = None
    fraction_of_free: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: object) -> object:
        if isinstance(value, dict):
            return value
        if isinstance(value, str) and _PERCENT_RE.match(value):
            fraction = float(_PERCENT_RE.match(value).group(1)) / 100  # type: ignore[union-attr]
            return {"fraction_of_free": fraction}
        if isinstance(value, float) and 0 < value <= 1:
            return {"fraction_of_free": value}
        return {"bytes": parse_byte_size(value)}  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _one_of(self) -> Capacity:
        if (self.bytes is None) == (self.fraction_of_free is None):
            raise ValueError("give either bytes (e.g. 4GiB) or a fraction of free memory (e.g. 50%)")
        if self.fraction_of_free is not None and not 0 < self.fraction_of_free <= 1:
            raise ValueError(f"a fraction of free memory must be in (0, 1], got {self.fraction_of_free}")
        return self

    def resolve(self, free_bytes: int) -> int:
        """Bytes this capacity stands for on a medium with ``free_bytes`` free."""
        if self.bytes is not None:
            return self.bytes
        assert self.fraction_of_free is not None
        return int(free_bytes * self.fraction_of_free)


class GpuTierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    capacity: Capacity = Field(
        default=Capacity(bytes=256 * 2**20),
        description="Bytes (e.g. 4GiB) or a fraction of free device memory (e.g. 50%). Where CUDA "
        "is absent a CPU tensor of this size stands in.",
    )
    device: str = Field(default="auto", description="'auto' (cuda:0 when present, else cpu), 'cpu' or 'cuda:N'.")
    eviction_policy: Literal["lru", "lfu"] | None = Field(
        default=None, description="This tier's eviction order; None inherits tiers.eviction_policy."
    )


class CpuTierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    capacity: Capacity = Field(
        default=Capacity(bytes=512 * 2**20),
        description="Bytes or a fraction of free host memory for the host page store.",
    )
    pinned: Literal["auto", "always", "never"] = Field(
        default="auto", description="Page-lock host memory: 'auto' pins when CUDA is present."
    )
    eviction_policy: Literal["lru", "lfu"] | None = Field(
        default=None, description="This tier's eviction order; None inherits tiers.eviction_policy."
    )


class NvmeTierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=False, description="Spill to NVMe files below the CPU tier.")
    capacity: Capacity = Field(
        default=Capacity(bytes=2 * 2**30),
        description="Bytes or a fraction of the free space on the NVMe paths, split across them.",
    )
    paths: tuple[str, ...] = Field(
        default=(), description="Directories that hold the page files (one file per directory)."
    )
    o_direct: Literal["auto", "always", "never"] = Field(
        default="auto", description="Use O_DIRECT where the filesystem allows ('auto' probes)."
    )
    io_threads: int = Field(default=4, gt=0, le=64, description="Threads doing NVMe reads and writes.")
    fsync: bool = Field(
        default=True,
        description="Flush pages and journal to the device so they survive a power loss as well "
        "as a crash (a killed process needs no flush).",
    )
    fsync_interval_s: float = Field(
        default=0.05, ge=0, le=60,
        description="0: flush every written batch before journaling it; > 0: group-commit in the "
        "background at this interval (a power loss forgets at most this much, never corrupts).",
    )
    eviction_policy: Literal["lru", "lfu"] | None = Field(
        default=None, description="This tier's eviction order; None inherits tiers.eviction_policy."
    )

    @model_validator(mode="after")
    def _paths_when_enabled(self) -> NvmeTierConfig:
        if self.enabled and not self.paths:
            raise ValueError("the NVMe tier is enabled but no paths are given")
        return self


class TiersConfig(BaseModel):
    """Capacities, watermarks and migration threads of the GPU, pinned-CPU and NVMe tiers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu: GpuTierConfig = Field(
        default_factory=GpuTierConfig, description="The top tier: device memory (a CPU stand-in without CUDA)."
    )
    cpu: CpuTierConfig = Field(
        default_factory=CpuTierConfig, description="The middle tier: (pinned) host memory."
    )
    nvme: NvmeTierConfig = Field(
        default_factory=NvmeTierConfig, description="The bottom tier: page files on local NVMe disks."
    )
    high_watermark: float = Field(
        default=0.90, gt=0, le=1, description="Occupancy above which cold pages are demoted."
    )
    low_watermark: float = Field(
        default=0.80, gt=0, le=1, description="Demotion stops once occupancy falls to this."
    )
    migration_threads: int = Field(default=2, gt=0, le=64, description="Worker threads moving pages.")
    eviction_policy: str = Field(
        default="lru", description="How each tier picks its coldest pages: lru or lfu."
    )
    promote_on_hit: bool = Field(
        default=True, description="Promote a page read from a lower tier back to the top tier."
    )

    @field_validator("eviction_policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in ("lru", "lfu"):
            raise ValueError(f"unknown tier eviction policy {value!r}; allowed: lru, lfu")
        return value

    @model_validator(mode="after")
    def _watermarks(self) -> TiersConfig:
        if self.low_watermark > self.high_watermark:
            raise ValueError(
                f"low_watermark ({self.low_watermark}) must not exceed high_watermark "
                f"({self.high_watermark})"
            )
        return self
