"""Building the tiered store from the ``tiers:`` YAML slice; misconfiguration fails loudly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from kvcluster.errors import ConfigError
from tiers.config import TiersConfig
from tiers.factory import MachineProbe, build_tiered_store
from tiers.nvme_journal import slot_bytes_for
from tiers.tiered_store import TieredStore

PAGE = 64 * 1024
MIB = 2**20
GIB = 2**30


class FakeMachine(MachineProbe):
    """A machine with chosen host memory and disk space (no CUDA)."""

    def __init__(self, host_available: int = 8 * GIB, host_total: int = 16 * GIB, disk: int = 100 * GIB) -> None:
        self.host = (host_available, host_total)
        self.disk = disk
        self.unwritable: set[Path] = set()

    def cuda_available(self) -> bool:
        return False

    def host_memory(self) -> tuple[int, int]:
        return self.host

    def disk_free(self, path: Path) -> int:
        return self.disk

    def unwritable_reason(self, directory: Path) -> str | None:
        return "Permission denied" if directory in self.unwritable else super().unwritable_reason(directory)


def _config(text: str) -> TiersConfig:
    return TiersConfig.model_validate(yaml.safe_load(text) or {})


def test_the_default_config_builds_gpu_and_cpu_tiers(stores: list[TieredStore]) -> None:
    config = _config("gpu: {capacity: 1MiB}\ncpu: {capacity: 2MiB}")
    store = build_tiered_store(config, PAGE, probe=FakeMachine())
    stores.append(store)
    stats = store.stats()
    assert store.tier_names == ["gpu", "cpu"]
    assert (stats["gpu"].pages_total, stats["cpu"].pages_total) == (16, 32)
    assert stats["gpu"].stand_in is not torch.cuda.is_available()
    store.put(1, torch.zeros(PAGE, dtype=torch.uint8))
    assert store.location(1) == "gpu"


def test_nvme_fractions_and_policies_come_from_yaml(tmp_path: Path, stores: list[TieredStore]) -> None:
    config = _config(
        f"""
        gpu: {{capacity: 1MiB, eviction_policy: lfu}}
        cpu: {{capacity: 50%}}
        nvme: {{enabled: true, capacity: 4MiB, paths: [{tmp_path}], o_direct: never, io_threads: 2}}
        high_watermark: 0.7
        low_watermark: 0.6
        eviction_policy: lru
        """
    )
    machine = FakeMachine(host_available=8 * MIB)
    store = build_tiered_store(config, PAGE, probe=machine)
    stores.append(store)
    stats = store.stats()
    assert store.tier_names == ["gpu", "cpu", "nvme"]
    assert stats["cpu"].pages_total == (4 * MIB) // PAGE  # half of the 8 MiB available
    assert stats["nvme"].pages_total == (4 * MIB) // slot_bytes_for(PAGE)
    assert stats["nvme"].io_mode == "buffered"
    assert [type(o).__name__ for o in store._orders] == ["LfuOrder", "LruOrder", "LruOrder"]
    assert (store._high, store._low) == (0.7, 0.6)


def test_a_restart_through_the_factory_recovers_nvme_pages(tmp_path: Path, stores: list[TieredStore]) -> None:
    config = _config(
        f"gpu: {{capacity: 256KiB}}\ncpu: {{capacity: 256KiB}}\n"
        f"nvme: {{enabled: true, capacity: 2MiB, paths: [{tmp_path}]}}"
    )
    page = torch.arange(PAGE, dtype=torch.int64).to(torch.uint8)
    store = build_tiered_store(config, PAGE, probe=FakeMachine())
    store.put(7, page)
    assert store.demote([7]).result(10).moved == (7,)
    assert store.demote([7]).result(10).moved == (7,)
    assert store.location(7) == "nvme"
    store.close()
    again = build_tiered_store(config, PAGE, probe=FakeMachine())
    stores.append(again)
    assert again.keys() == [7] and torch.equal(again.get(7), page)


def _problems(config: TiersConfig, machine: MachineProbe | None = None, page: int = PAGE) -> str:
    with pytest.raises(ConfigError) as raised:
        build_tiered_store(config, page, probe=machine or FakeMachine())
    return str(raised.value)


def test_a_missing_nvme_path_fails_startup(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    text = _problems(_config(f"nvme: {{enabled: true, paths: ['{missing}']}}"))
    assert "tiers.nvme.paths" in text and str(missing) in text and "does not exist" in text


def test_an_nvme_path_that_is_a_file_fails_startup(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    text = _problems(_config(f"nvme: {{enabled: true, paths: ['{a_file}']}}"))
    assert "tiers.nvme.paths" in text and "not a directory" in text


def test_a_non_writable_nvme_directory_fails_startup(tmp_path: Path) -> None:
    machine = FakeMachine()
    machine.unwritable.add(tmp_path)
    text = _problems(_config(f"nvme: {{enabled: true, paths: ['{tmp_path}']}}"), machine)
    assert "tiers.nvme.paths" in text and "not writable" in text and "Permission denied" in text


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into any directory")
def test_a_read_only_directory_is_detected_for_real(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    try:
        text = _problems(_config(f"nvme: {{enabled: true, paths: ['{locked}']}}"))
        assert "not writable" in text
    finally:
        locked.chmod(0o700)


def test_more_host_memory_than_available_fails_startup() -> None:
    machine = FakeMachine(host_available=1 * GIB, host_total=2 * GIB)
    text = _problems(_config("cpu: {capacity: 4GiB}\ngpu: {capacity: 1MiB}"), machine)
    assert "tiers.cpu.capacity" in text and "4.00 GiB" in text and "1.00 GiB" in text
    if not torch.cuda.is_available():
        assert "tiers.gpu.capacity (CPU stand-in)" in text


def test_more_disk_than_free_fails_startup(tmp_path: Path) -> None:
    machine = FakeMachine(disk=10 * GIB)
    text = _problems(_config(f"nvme: {{enabled: true, capacity: 1TB, paths: ['{tmp_path}']}}"), machine)
    assert "tiers.nvme.capacity" in text and str(tmp_path) in text and "10.00 GiB" in text


def test_the_real_disk_is_checked(tmp_path: Path) -> None:
    text = _problems(_config(f"nvme: {{enabled: true, capacity: 1000TB, paths: ['{tmp_path}']}}"), MachineProbe())
    assert "tiers.nvme.capacity" in text and "free" in text


def test_capacities_below_one_page_fail_startup(tmp_path: Path) -> None:
    text = _problems(
        _config(f"gpu: {{capacity: 1KiB}}\nnvme: {{enabled: true, capacity: 1KiB, paths: ['{tmp_path}']}}")
    )
    assert "tiers.gpu.capacity: 1024 bytes hold no page" in text
    assert "tiers.nvme.capacity" in text


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    machine = FakeMachine(host_available=1 * GIB)
    with pytest.raises(ConfigError) as raised:
        build_tiered_store(
            _config(f"cpu: {{capacity: 4GiB, pinned: always}}\nnvme: {{enabled: true, paths: ['{tmp_path}/x']}}"),
            PAGE,
            probe=machine,
        )
    problems = raised.value.problems
    assert any(p.startswith("tiers.cpu.capacity") for p in problems)
    assert any(p.startswith("tiers.nvme.paths") for p in problems)
    if not torch.cuda.is_available():
        assert any(p.startswith("tiers.cpu.pinned") for p in problems)


def test_an_unknown_device_fails_startup() -> None:
    text = _problems(_config("gpu: {device: 'cuda:7'}"))
    assert "tiers.gpu.device" in text


def test_a_bad_page_size_fails() -> None:
    with pytest.raises(ConfigError):
        build_tiered_store(TiersConfig(), 0, probe=FakeMachine())


@pytest.mark.gpu
def test_more_device_memory_than_free_fails_startup() -> None:
    _, total = torch.cuda.mem_get_info()
    text = _problems(_config(f"gpu: {{capacity: {total * 2}}}"), MachineProbe())
    assert "tiers.gpu.capacity" in text and "free" in text
