"""Fixtures for the tier tests: one factory per medium, so one contract suite runs on all."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tiers.device_tier import DeviceTier
from tiers.host_tier import HostTier
from tiers.nvme_tier import NvmeTier, probe_o_direct
from tiers.page_store import PageStore

TierFactory = Callable[[int, int], PageStore]

MEDIA = [
    "device-standin",
    pytest.param("device-cuda", marks=pytest.mark.gpu),
    "host",
    "nvme-direct",
    "nvme-buffered",
]


def make_tier(medium: str, directory: Path, num_slots: int, page_bytes: int) -> PageStore:
    if medium == "device-standin":
        return DeviceTier(num_slots, page_bytes, device="cpu")
    if medium == "device-cuda":
        return DeviceTier(num_slots, page_bytes, device="cuda")
    if medium == "host":
        return HostTier(num_slots, page_bytes)
    if medium == "nvme-direct":
        reason = probe_o_direct(directory)
        if reason is not None:
            pytest.skip(f"O_DIRECT unusable here: {reason}")
        return NvmeTier([directory], num_slots, page_bytes, o_direct="always", io_threads=2)
    if medium == "nvme-buffered":
        return NvmeTier([directory], num_slots, page_bytes, o_direct="never", io_threads=2)
    raise AssertionError(medium)


@pytest.fixture(params=MEDIA)
def medium(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def tier_factory(medium: str, tmp_path: Path) -> Iterator[TierFactory]:
    """Builds tiers of ``medium`` (each NVMe tier in its own directory); closes them after."""
    made: list[PageStore] = []

    def build(num_slots: int, page_bytes: int) -> PageStore:
        directory = tmp_path / f"tier{len(made)}"
        directory.mkdir()
        tier = make_tier(medium, directory, num_slots, page_bytes)
        made.append(tier)
        return tier

    yield build
    for tier in made:
        tier.close()


def random_pages(n: int, page_bytes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, page_bytes), dtype=torch.uint8, generator=generator)
