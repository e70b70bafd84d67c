"""GPU paths: a CUDA device tier, page-locked host memory, moves on CUDA streams (``gpu``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiers.conftest import random_pages
from tiers.device_tier import DeviceTier
from tiers.host_tier import HostTier
from tiers.nvme_tier import NvmeTier
from tiers.page_store import copy_pages
from tiers.tiered_store import TieredStore

pytestmark = pytest.mark.gpu
P = 64 * 1024


def test_the_device_tier_lives_on_the_gpu_and_the_host_tier_is_pinned() -> None:
    device = DeviceTier(4, P, device="auto")
    host = HostTier(4, P)
    try:
        assert device.device.type == "cuda" and not device.stats().stand_in
        assert device.stats().io_mode == "cuda"
        assert host.pinned and host.page_views(host.allocate(1))[0].is_pinned()  # type: ignore[arg-type]
    finally:
        device.close()
        host.close()


def test_batches_cross_pcie_both_ways_on_the_tier_streams() -> None:
    device = DeviceTier(16, P, device="cuda")
    host = HostTier(16, P)
    try:
        pages = random_pages(10, P, seed=1)
        hs, ds = host.allocate(10), device.allocate(10)
        assert hs is not None and ds is not None
        host.write_batch(hs, pages)
        copy_pages(host, hs, device, ds)
        gathered = device.read_batch(ds)
        assert gathered.is_cuda and torch.equal(gathered.cpu(), pages)
        back = host.allocate(5)
        assert back is not None
        copy_pages(device, ds[:5], host, back)
        assert all(torch.equal(host.read(int(s)), pages[i]) for i, s in enumerate(back))
        device.write_batch(ds[:2], pages[5:7].cuda())  # a device-resident 2-D batch: one scatter
        assert torch.equal(device.read(int(ds[1])), pages[6])
    finally:
        device.close()
        host.close()


def test_a_store_with_a_gpu_top_promotes_from_nvme_to_the_device(tmp_path: Path) -> None:
    tiers = [DeviceTier(4, P, device="cuda"), HostTier(4, P), NvmeTier([tmp_path], 16, P)]
    store = TieredStore(tiers, high_watermark=1.0, low_watermark=1.0)
    try:
        pages = random_pages(3, P, seed=2)
        for key in range(3):
            store.put(key, pages[key])
        assert store.demote([0]).result(10).moved == (0,)
        assert store.demote([0]).result(10).moved == (0,)
        assert store.location(0) == "nvme"
        assert store.prefetch([0]).result(10).moved == (0,)
        assert store.location(0) == "gpu"
        out = torch.empty(P, dtype=torch.uint8, device="cuda")
        assert torch.equal(store.get(0, out=out).cpu(), pages[0])
    finally:
        store.close()
