"""Memory calculator: what a model's KV cache costs and how much of it a node can hold.

All figures are exact integers derived from a :class:`ModelSpec`:

- bytes per token = ``layers * kv_components * kv_heads_per_rank * kv_head_dim * dtype_bytes``
  per tensor-parallel rank (K and V: 2 components; MLA caches one latent of
  ``kv_lora_rank + qk_rope_head_dim`` per token and layer, replicated on every rank). With
  fewer KV heads than ranks each rank keeps one head (heads are replicated), as vLLM does.
- bytes per block = bytes per token * block_size (a page holds every layer of a block).
- blocks per tier = floor(capacity / bytes per block); a partial block cannot be used.
- blocks per sequence = ceil(context / block_size).
- max concurrent sequences = floor(blocks / blocks per sequence).

A tier's capacity is absolute or a fraction of the medium's free memory at start; the free
memory comes from a :class:`FreeMemory` probe (injected, so tests never depend on the host).
Nothing here allocates K/V memory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvcluster.config import KVClusterConfig
from kvcluster.errors import InvalidArgument
from kvcluster.model_spec import ModelSpec
from tiers.config import Capacity


def host_free_bytes() -> int:
    """Free host memory (available physical pages x page size), via ``os.sysconf``."""
    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def gpu_free_bytes(device: str = "auto") -> int:
    """Free memory of the GPU tier's device; on a machine without CUDA (or ``device='cpu'``)
    the GPU tier is a CPU tensor, so host memory stands in."""
    if device != "cpu" and torch.cuda.is_available():
        target = torch.device("cuda:0" if device == "auto" else device)
        return int(torch.cuda.mem_get_info(target)[0])
    return host_free_bytes()


def disk_free_bytes(paths: tuple[str, ...]) -> int:
    """Free bytes on the filesystems of ``paths`` (each counted once, from its nearest
    existing ancestor)."""
    seen: set[int] = set()
    total = 0
    for raw in paths:
        path = Path(raw).absolute()
        while not path.exists() and path != path.parent:
            path = path.parent
        device = path.stat().st_dev
        if device in seen:
            continue
        seen.add(device)
        total += shutil.disk_usage(path).free
    return total


@dataclass(slots=True, frozen=True)
class FreeMemory:
    """Where free memory figures come from; swap the callables in tests."""

    gpu: Callable[[str], int] = gpu_free_bytes
    host: Callable[[], int] = host_free_bytes
    disk: Callable[[tuple[str, ...]], int] = disk_free_bytes


# --- the arithmetic ------------------------------------------------------------------------


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")
    return value


def bytes_per_token(spec: ModelSpec) -> int:
    """K/V bytes of one token on one tensor-parallel rank, all layers."""
    return spec.bytes_per_token


def bytes_per_token_all_ranks(spec: ModelSpec) -> int:
    """K/V bytes of one token summed over every tensor-parallel rank (replicas included)."""
    return spec.bytes_per_token * spec.tensor_parallel


def bytes_per_block(spec: ModelSpec, block_size: int) -> int:
    return spec.bytes_per_block(_positive("block_size", block_size))


def blocks_in(spec: ModelSpec, block_size: int, budget_bytes: int) -> int:
    """Whole blocks that fit in ``budget_bytes`` (per rank)."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise InvalidArgument(f"a memory budget must be a non-negative integer, got {budget_bytes!r}")
    return budget_bytes // bytes_per_block(spec, block_size)


def blocks_per_sequence(context: int, block_size: int) -> int:
    return -(-_positive("context", context) // _positive("block_size", block_size))


def max_concurrent_sequences(blocks: int, context: int, block_size: int) -> int:
    """Sequences of ``context`` tokens that ``blocks`` blocks hold at once."""
    return blocks // blocks_per_sequence(context, block_size)


@dataclass(slots=True, frozen=True)
class LoadCheck:
    """Whether ``sequences`` x ``context`` tokens fit in ``blocks_available`` blocks."""

    sequences: int
    context: int
    blocks_needed: int
    blocks_available: int
    bytes_needed: int

    @property
    def fits(self) -> bool:
        return self.blocks_needed <= self.blocks_available

    @property
    def shortfall_blocks(self) -> int:
        return max(0, self.blocks_needed - self.blocks_available)


def check_load(
    spec: ModelSpec, block_size: int, blocks_available: int, sequences: int, context: int
) -> LoadCheck:
    if isinstance(sequences, bool) or not isinstance(sequences, int) or sequences < 0:
        raise InvalidArgument(f"sequences must be a non-negative integer, got {sequences!r}")
    needed = sequences * blocks_per_sequence(context, block_size)
    return LoadCheck(
        sequences=sequences,
        context=context,
        blocks_needed=needed,
        blocks_available=blocks_available,
        bytes_needed=needed * bytes_per_block(spec, block_size),
    )


# --- plans ---------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class TierPlan:
    """One tier's share: its capacity in bytes (resolved), blocks and sequences at the context."""

    name: str
    capacity_bytes: int
    source: str  # how the capacity was obtained, e.g. "4 GiB" or "50% of 20.0 GiB free"
    blocks: int
    tokens: int
    sequences: int


@dataclass(slots=True, frozen=True)
class MemoryPlan:
    """Everything ``kvcluster plan`` prints. ``engine_blocks`` is the node's paged-KV pool
    (``cache.num_blocks`` when set, else the GPU tier's blocks); ``load`` is ``None`` when no
    load was asked about, else checked against the engine pool and against all tiers."""

    spec: ModelSpec
    block_size: int
    context: int
    bytes_per_token: int
    bytes_per_token_all_ranks: int
    bytes_per_block: int
    blocks_per_sequence: int
    bytes_per_sequence: int
    tiers: tuple[TierPlan, ...]
    engine_blocks: int
    engine_sequences: int
    load: LoadCheck | None = None
    load_all_tiers: LoadCheck | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def total_blocks(self) -> int:
        return sum(t.blocks for t in self.tiers)


def _tier(
    name: str, spec: ModelSpec, block_size: int, context: int, capacity_bytes: int, source: str
) -> TierPlan:
    blocks = blocks_in(spec, block_size, capacity_bytes)
    return TierPlan(
        name=name,
        capacity_bytes=capacity_bytes,
        source=source,
        blocks=blocks,
        tokens=blocks * block_size,
        sequences=max_concurrent_sequences(blocks, context, block_size),
    )


def _resolve(capacity: Capacity, free: Callable[[], int]) -> tuple[int, str]:
    if capacity.bytes is not None:
        return capacity.bytes, format_bytes(capacity.bytes)
    free_bytes = free()
    fraction = capacity.fraction_of_free or 0.0
    return capacity.resolve(free_bytes), f"{fraction:.0%} of {format_bytes(free_bytes)} free"


def plan(
    spec: ModelSpec,
    *,
    block_size: int,
    context: int,
    tiers: tuple[tuple[str, int, str], ...],
    engine_blocks: int | None = None,
    sequences: int | None = None,
    notes: tuple[str, ...] = (),
) -> MemoryPlan:
    """A plan for ``spec`` over ``tiers`` (name, capacity bytes, source text), the first tier
    being the one the engine's pool lives in unless ``engine_blocks`` says otherwise."""
    _positive("block_size", block_size)
    _positive("context", context)
    tier_plans = tuple(_tier(n, spec, block_size, context, b, s) for n, b, s in tiers)
    pool = engine_blocks if engine_blocks is not None else (tier_plans[0].blocks if tier_plans else 0)
    per_seq = blocks_per_sequence(context, block_size)
    load = all_tiers = None
    if sequences is not None:
        load = check_load(spec, block_size, pool, sequences, context)
        all_tiers = check_load(spec, block_size, sum(t.blocks for t in tier_plans), sequences, context)
    return MemoryPlan(
        spec=spec,
        block_size=block_size,
        context=context,
        bytes_per_token=bytes_per_token(spec),
        bytes_per_token_all_ranks=bytes_per_token_all_ranks(spec),
        bytes_per_block=bytes_per_block(spec, block_size),
        blocks_per_sequence=per_seq,
        bytes_per_sequence=per_seq * bytes_per_block(spec, block_size),
        tiers=tier_plans,
        engine_blocks=pool,
        engine_sequences=max_concurrent_sequences(pool, context, block_size),
        load=load,
        load_all_tiers=all_tiers,
        notes=notes,
    )


def plan_for_model(
    spec: ModelSpec,
    memory_bytes: int,
    *,
    block_size: int = 16,
    context: int = 32768,
    sequences: int | None = None,
) -> MemoryPlan:
    """A plan for one GPU (per rank) with ``memory_bytes`` for KV."""
    return plan(
        spec,
        block_size=block_size,
        context=context,
        tiers=(("gpu", memory_bytes, "budget"),),
        sequences=sequences,
    )


def plan_from_config(
    config: KVClusterConfig,
    *,
    free_memory: FreeMemory | None = None,
    context: int | None = None,
    sequences: int | None = None,
    gpu_bytes: int | None = None,
) -> MemoryPlan:
    """A plan for the configuration's model, block size and tiers (GPU, CPU, NVMe if enabled).

    ``context`` defaults to ``cache.max_context``; ``gpu_bytes`` overrides the GPU tier.
    """
    probe = free_memory or FreeMemory()
    t = config.tiers
    if gpu_bytes is not None:
        gpu = (gpu_bytes, format_bytes(gpu_bytes))
    else:
        gpu = _resolve(t.gpu.capacity, lambda: probe.gpu(t.gpu.device))
    tiers = [("gpu", *gpu), ("cpu", *_resolve(t.cpu.capacity, probe.host))]
    if t.nvme.enabled:
        tiers.append(("nvme", *_resolve(t.nvme.capacity, lambda: probe.disk(t.nvme.paths))))
    notes = []
    if config.cache.num_blocks is not None:
        notes.append(f"engine pool fixed by cache.num_blocks = {config.cache.num_blocks:,}")
    return plan(
        config.model,
        block_size=config.cache.block_size,
        context=context if context is not None else config.cache.max_context,
        tiers=tuple(tiers),
        engine_blocks=config.cache.num_blocks,
        sequences=sequences,
        notes=tuple(notes),
    )


# --- text ----------------------------------------------------------------------------------


def format_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``; binary units, one decimal, exact bytes below 1 KiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def render(plan_: MemoryPlan) -> str:
    """The plan as an aligned, plain-text table (no colour codes)."""
    s = plan_.spec
    if s.is_mla:
        shape = f"MLA latent {s.kv_lora_rank} + rope {s.qk_rope_head_dim} per token and layer"
    else:
        group = s.num_attention_heads // s.num_kv_heads
        kind = "MHA" if group == 1 else f"GQA {s.num_attention_heads}/{s.num_kv_heads}"
        shape = f"{s.num_kv_heads} KV heads x {s.head_dim} dim ({kind})"
    ranks = s.tensor_parallel
    lines = [
        f"Model {s.name}: {s.num_layers} layers, {shape}, {s.dtype}, tensor parallel {ranks}",
        "",
        f"  KV per token     {plan_.bytes_per_token:>16,} B  ({format_bytes(plan_.bytes_per_token)}"
        f" per rank; {plan_.bytes_per_token_all_ranks:,} B across {ranks} rank(s))",
        f"  KV per block     {plan_.bytes_per_block:>16,} B  ({format_bytes(plan_.bytes_per_block)}"
        f", block_size {plan_.block_size})",
        f"  one sequence     {plan_.bytes_per_sequence:>16,} B  ({format_bytes(plan_.bytes_per_sequence)}"
        f" = {plan_.blocks_per_sequence:,} blocks for {plan_.context:,} tokens)",
        "",
    ]
    header = ("tier", "capacity", "blocks", "tokens", f"seqs @ {plan_.context:,}", "from")
    rows = [
        (t.name, format_bytes(t.capacity_bytes), f"{t.blocks:,}", f"{t.tokens:,}",
         f"{t.sequences:,}", t.source)
        for t in plan_.tiers
    ]
    if len(plan_.tiers) > 1:
        total = plan_.total_blocks
        rows.append((
            "total", format_bytes(sum(t.capacity_bytes for t in plan_.tiers)), f"{total:,}",
            f"{total * plan_.block_size:,}",
            f"{max_concurrent_sequences(total, plan_.context, plan_.block_size):,}", "",
        ))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    right = {1, 2, 3, 4}

    def fmt(row: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  " + "  ".join(cells).rstrip()

    lines.append(fmt(header))
    lines.append("  " + "  ".join("-" * w for w in widths))
    lines.extend(fmt(r) for r in rows)
    lines.append("")
    lines.append(
        f"  engine pool      {plan_.engine_blocks:,} blocks -> {plan_.engine_sequences:,} concurrent "
        f"sequences of {plan_.context:,} tokens"
    )
    lines.extend(f"  note: {n}" for n in plan_.notes)
    if plan_.load is not None and plan_.load_all_tiers is not None:
        load = plan_.load
        verdict = "FITS" if load.fits else "DOES NOT FIT"
        lines.append(
            f"  planned load     {load.sequences:,} x {load.context:,} tokens = "
            f"{load.blocks_needed:,} blocks ({format_bytes(load.bytes_needed)}): {verdict} in the "
            f"engine pool of {load.blocks_available:,} blocks"
            + ("" if load.fits else f" (short by {load.shortfall_blocks:,} blocks)")
        )
        if len(plan_.tiers) > 1:
            every = plan_.load_all_tiers
            lines.append(
                f"                   across all tiers ({every.blocks_available:,} blocks): "
                + ("fits" if every.fits else f"does not fit (short by {every.shortfall_blocks:,})")
            )
    return "\n".join(lines)
