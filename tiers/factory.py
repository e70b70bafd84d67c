"""Build a :class:`~tiers.tiered_store.TieredStore` from the ``tiers:`` configuration slice.

Every capacity is resolved against what the machine has: device memory from
``torch.cuda.mem_get_info``, host memory from ``os.sysconf`` (and ``MemAvailable``), disk space
from ``shutil.disk_usage``. A bad NVMe path, a directory that is not writable, a capacity larger
than the medium has free or too small for one page fail startup with one
:class:`~kvcluster.errors.ConfigError` that lists every problem with its field path and values.
The probes are injectable (:class:`MachineProbe`) so tests need no particular machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvcluster.errors import ConfigError, InvalidArgument, KVClusterError
from tiers.config import TiersConfig
from tiers.device_tier import DeviceTier, resolve_device
from tiers.host_tier import HostTier
from tiers.nvme_journal import slot_bytes_for
from tiers.nvme_tier import NvmeTier
from tiers.page_store import PageStore
from tiers.tiered_store import DiscardListener, MoveListener, TieredStore

_GIB = 2**30


class MachineProbe:
    """What this machine has. Subclass (or pass another object with these methods) in tests."""

    def cuda_available(self) -> bool:
        return torch.cuda.is_available()

    def device_memory(self, device: torch.device) -> tuple[int, int]:
        """``(free, total)`` bytes of a CUDA device."""
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)

    def host_memory(self) -> tuple[int, int]:
        """``(available, total)`` bytes of host memory: MemAvailable where Linux reports it
        (free plus reclaimable cache), else free physical pages."""
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        available = os.sysconf("SC_AVPHYS_PAGES") * page
        with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
        return available, total

    def disk_free(self, path: Path) -> int:
        return shutil.disk_usage(path).free

    def unwritable_reason(self, directory: Path) -> str | None:
        """``None`` if a file can be created in ``directory``, else why not."""
        try:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".kvcluster-write-probe-"):
                pass
        except OSError as exc:
            return exc.strerror or str(exc)
        return None


def _gib(n: float) -> str:
    return f"{n / _GIB:.2f} GiB ({int(n)} bytes)"


def build_tiered_store(
    config: TiersConfig,
    page_bytes: int,
    *,
    probe: MachineProbe | None = None,
    file_stem: str = "kvcluster-pages",
    recover: bool = True,
    on_move: MoveListener | None = None,
    on_discard: DiscardListener | None = None,
    clock: Callable[[], float] = time.monotonic,
    include_device: bool = True,
) -> TieredStore:
    """GPU (or its CPU stand-in), pinned-CPU and, when enabled, NVMe tiers in one store.

    ``include_device=False`` leaves the GPU tier out (its capacity is still checked): for a
    caller whose device pages live elsewhere, such as a node engine's own page buffer, and
    that wants only the host and NVMe tiers beneath it.

    ``file_stem`` names the NVMe files (one node per stem and directory: the files are locked).
    With ``recover`` the NVMe tier finds the pages of a previous run (warm restart); they are
    in ``store.keys()`` when this returns. Raises ConfigError listing every problem.
    """
    if page_bytes <= 0:
        raise ConfigError(f"page_bytes must be positive, got {page_bytes}")
    machine = probe or MachineProbe()
    problems: list[str] = []
    cuda = machine.cuda_available()

    # GPU tier (or its stand-in in host memory).
    device = torch.device("cpu")
    gpu_bytes = 0
    try:
        device = resolve_device(config.gpu.device) if cuda or config.gpu.device != "auto" else device
    except InvalidArgument as exc:
        problems.append(f"tiers.gpu.device: {exc}")
    stand_in = device.type != "cuda"
    host_available, host_total = machine.host_memory()
    if not stand_in:
        free, total = machine.device_memory(device)
        gpu_bytes = config.gpu.capacity.resolve(free)
        if gpu_bytes > free:
            problems.append(
                f"tiers.gpu.capacity: {_gib(gpu_bytes)} requested but {device} has only "
                f"{_gib(free)} free (of {_gib(total)})"
            )
    else:
        gpu_bytes = config.gpu.capacity.resolve(host_available)

    # Pinned-CPU tier; a stand-in GPU tier shares host memory with it.
    cpu_bytes = config.cpu.capacity.resolve(host_available)
    host_demand = cpu_bytes + (gpu_bytes if stand_in else 0)
    if host_demand > host_available:
        what = "tiers.cpu.capacity" + (" + tiers.gpu.capacity (CPU stand-in)" if stand_in else "")
        problems.append(
            f"{what}: {_gib(host_demand)} requested but the host has only {_gib(host_available)} "
            f"available (of {_gib(host_total)})"
        )
    if config.cpu.pinned == "always" and not cuda:
        problems.append("tiers.cpu.pinned: 'always' needs CUDA to page-lock memory; none is present")

    for field, capacity in (("tiers.gpu.capacity", gpu_bytes), ("tiers.cpu.capacity", cpu_bytes)):
        if capacity < page_bytes:
            problems.append(f"{field}: {capacity} bytes hold no page of {page_bytes} bytes")

    # NVMe tier.
    nvme_slots = 0
    slot_bytes = slot_bytes_for(page_bytes)
    if config.nvme.enabled:
        nvme_slots = _check_nvme(config, machine, file_stem, slot_bytes, problems)

    if problems:
        raise ConfigError("invalid tier configuration", problems)

    tiers: list[PageStore] = []
    try:
        if include_device:
            tiers.append(DeviceTier(gpu_bytes // page_bytes, page_bytes, device=device, clock=clock))
        tiers.append(HostTier(cpu_bytes // page_bytes, page_bytes, pinned=config.cpu.pinned, clock=clock))
        if config.nvme.enabled:
            tiers.append(
                NvmeTier(
                    config.nvme.paths, nvme_slots, page_bytes, o_direct=config.nvme.o_direct,
                    io_threads=config.nvme.io_threads, fsync=config.nvme.fsync,
                    fsync_interval_s=config.nvme.fsync_interval_s,
                    file_stem=file_stem, recover=recover, clock=clock,
                )
            )
    except KVClusterError as exc:
        for tier in tiers:
            tier.close()
        field = ["tiers.gpu", "tiers.cpu", "tiers.nvme"][len(tiers) + (0 if include_device else 1)]
        raise ConfigError("invalid tier configuration", [f"{field}: {exc}"]) from None
    tier_configs = (config.gpu, config.cpu, config.nvme) if include_device else (config.cpu, config.nvme)
    policies = [
        tier_config.eviction_policy or config.eviction_policy for tier_config in tier_configs
    ][: len(tiers)]
    return TieredStore(
        tiers,
        high_watermark=config.high_watermark,
        low_watermark=config.low_watermark,
        migration_threads=config.migration_threads,
        policy=policies,
        promote_on_hit=config.promote_on_hit,
        on_move=on_move,
        on_discard=on_discard,
        clock=clock,
    )


def _check_nvme(
    config: TiersConfig, machine: MachineProbe, file_stem: str, slot_bytes: int, problems: list[str]
) -> int:
    """The NVMe slot count; appends a line to ``problems`` for each bad path or capacity."""
    nvme = config.nvme
    by_device: dict[int, list[Path]] = {}
    free_on: dict[int, int] = {}
    for raw in nvme.paths:
        path = Path(raw)
        if not path.exists():
            problems.append(f"tiers.nvme.paths: {raw!r} does not exist")
            continue
        if not path.is_dir():
            problems.append(f"tiers.nvme.paths: {raw!r} is not a directory")
            continue
        reason = machine.unwritable_reason(path)
        if reason is not None:
            problems.append(f"tiers.nvme.paths: {raw!r} is not writable ({reason})")
            continue
        dev = path.stat().st_dev
        by_device.setdefault(dev, []).append(path)
        existing = path / f"{file_stem}.pages"
        reusable = existing.stat().st_size if existing.exists() else 0
        free_on[dev] = free_on.get(dev, machine.disk_free(path)) + reusable
    if len(by_device) == 0 or sum(len(p) for p in by_device.values()) != len(nvme.paths):
        return 0
    total_free = sum(free_on.values())
    capacity = nvme.capacity.resolve(total_free)
    share = capacity // len(nvme.paths)
    for dev, paths in by_device.items():
        wanted = share * len(paths)
        if wanted > free_on[dev]:
            names = ", ".join(str(p) for p in paths)
            problems.append(
                f"tiers.nvme.capacity: {_gib(wanted)} requested on {names} but that filesystem has "
                f"only {_gib(free_on[dev])} free"
            )
    slots = capacity // slot_bytes
    if slots < len(nvme.paths):
        problems.append(
            f"tiers.nvme.capacity: {capacity} bytes hold fewer than one {slot_bytes}-byte slot per path"
        )
    return slots
