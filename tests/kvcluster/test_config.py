from __future__ import annotations

from pathlib import Path

import pytest

from kvcluster.config import KVClusterConfig, load_config
from kvcluster.errors import ConfigError
from kvcluster.model_spec import PRESETS


def test_defaults_load_without_a_file() -> None:
    config = load_config(None, apply_env=False)
    assert config.cache.block_size == 16
    assert config.registry.backend == "memory"


def test_every_problem_is_reported_with_file_path_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "model: llama-3-8b\n"
        "cache:\n  block_size: -1\n  bogus: 1\n  eviction: {policy: fifo}\n"
        "tiers:\n  cpu: {capacity: 12 parsecs}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, apply_env=False)
    problems = info.value.problems
    assert len(problems) == 4
    text = str(info.value)
    assert str(path) in text
    assert "cache.block_size" in text and "(got -1)" in text
    assert "cache.bogus: unknown key" in text
    assert "valid policies: lru, lfu, reuse, ttl" in text
    assert "tiers.cpu.capacity" in text and "parsecs" in text


def test_model_preset_with_overrides() -> None:
    config = KVClusterConfig.from_dict({"model": {"preset": "llama-3-8b", "dtype": "fp8_e4m3"}})
    assert config.model.num_layers == 32
    assert config.model.bytes_per_token == PRESETS["llama-3-8b"].bytes_per_token // 2


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="llama-3-70b"):
        KVClusterConfig.from_dict({"model": "gpt-9"})


def test_environment_overrides_the_registry_url() -> None:
    config = KVClusterConfig().with_env({"KVCLUSTER_REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert config.registry.backend == "redis"
    assert config.registry.url == "redis://127.0.0.1:6379/0"


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_config_is_frozen() -> None:
    config = KVClusterConfig()
    with pytest.raises(Exception, match="frozen"):
        config.cache.block_size = 32  # type: ignore[misc]


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_default_yaml_lists_exactly_the_schema_defaults() -> None:
    assert load_config(CONFIGS / "default.yaml", apply_env=False) == KVClusterConfig()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path, apply_env=False)
    assert config.cache.block_size > 0


def test_ttl_seconds_without_a_ttl_policy_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"lru\+ttl"):
        KVClusterConfig.from_dict({"cache": {"eviction": {"policy": "lru", "ttl_s": 60}}})
    config = KVClusterConfig.from_dict({"cache": {"eviction": {"policy": "lru+ttl", "ttl_s": 60}}})
    assert config.cache.eviction.ttl_s == 60


def test_router_placement_settings_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("router:\n  placement_half_life_requests: 0\n  fallback_choices: 17\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, apply_env=False)
    text = str(info.value)
    assert "router.placement_half_life_requests" in text and "(got 0)" in text
    assert "router.fallback_choices" in text and "(got 17)" in text
    path.write_text("router:\n  placement_half_life_requests: 64\n  fallback_choices: 2\n")
    router = load_config(path, apply_env=False).router
    assert (router.placement_half_life_requests, router.fallback_choices) == (64, 2)
