"""Configuration checks that span fields or sections, and the environment override."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from kvcluster.config import KVClusterConfig, load_config
from kvcluster.errors import ConfigError
from kvcluster.model_spec import PRESETS, ModelSpec

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_a_bad_redis_url_from_the_environment_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        KVClusterConfig().with_env({"KVCLUSTER_REDIS_URL": "http://redis:6379"})
    assert "KVCLUSTER_REDIS_URL" in str(info.value) and "http://redis:6379" in str(info.value)


@pytest.mark.parametrize("tp", [3, 5, 6, 12])
def test_tensor_parallel_must_split_the_kv_heads_evenly(tp: int) -> None:
    # 8 KV heads over 3 ranks cannot be split (8 // 3 = 2 heads per rank would drop two).
    with pytest.raises(ConfigError, match=r"tensor_parallel \(\d+\).*num_kv_heads \(8\)"):
        KVClusterConfig.from_dict({"model": {"preset": "llama-3-8b", "tensor_parallel": tp}})


@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16, 32])
def test_tensor_parallel_that_splits_or_replicates_heads_is_accepted(tp: int) -> None:
    spec = KVClusterConfig.from_dict({"model": {"preset": "llama-3-8b", "tensor_parallel": tp}}).model
    assert spec.kv_heads_per_rank == max(1, 8 // tp)
    # MLA replicates its latent on every rank, whatever the degree.
    assert ModelSpec.model_validate({**PRESETS["deepseek-v3"].model_dump(), "tensor_parallel": 3})


def test_rope_dim_without_an_mla_latent_is_rejected() -> None:
    with pytest.raises(ConfigError, match="qk_rope_head_dim"):
        KVClusterConfig.from_dict({"model": {"preset": "deepseek-v3", "kv_lora_rank": None}})


@pytest.mark.parametrize(
    ("tiers", "field"),
    [
        ({"gpu": {"capacity": "1MiB"}}, "tiers.gpu.capacity"),
        ({"cpu": {"capacity": "0B"}}, "tiers.cpu.capacity"),
        ({"nvme": {"enabled": True, "paths": ["/tmp"], "capacity": "1KiB"}}, "tiers.nvme.capacity"),
    ],
)
def test_a_tier_smaller_than_one_page_is_rejected(tiers: dict[str, object], field: str) -> None:
    # llama-3-8b: 128 KiB per token, 2 MiB per block of 16.
    with pytest.raises(ConfigError) as info:
        KVClusterConfig.from_dict({"model": "llama-3-8b", "tiers": tiers})
    text = str(info.value)
    assert field in text and "2097152" in text


def test_a_fraction_or_a_disabled_nvme_tier_is_not_checked_against_the_page() -> None:
    config = KVClusterConfig.from_dict({
        "model": "llama-3-8b",
        "tiers": {"gpu": {"capacity": "50%"}, "cpu": {"capacity": "2MiB"}, "nvme": {"capacity": "1KiB"}},
    })
    assert config.tiers.cpu.capacity.bytes == 2 * 2**20


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and name != "model" \
                and annotation.__name__ != "Capacity":
            keys |= _leaf_keys(annotation, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _yaml_keys(data: object, prefix: str = "") -> set[str]:
    if not isinstance(data, dict):
        return set()
    keys = set()
    for name, value in data.items():
        nested = _yaml_keys(value, f"{prefix}{name}.") if name not in ("model", "tier_weights") else set()
        keys |= nested or {f"{prefix}{name}"}
    return keys


def test_default_yaml_names_every_key() -> None:
    # The file says (as do the README and docs/configuration.md) that it lists every key.
    data = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert sorted(_leaf_keys(KVClusterConfig) - _yaml_keys(data)) == []
    assert load_config(CONFIGS / "default.yaml", apply_env=False) == KVClusterConfig()



@pytest.mark.parametrize("capacity", [None, [1, 2], {"size": 3}])
def test_a_capacity_that_is_not_a_size_is_a_config_error_naming_it(capacity: object) -> None:
    with pytest.raises(ConfigError, match="cpu"):
        KVClusterConfig.from_dict({"tiers": {"cpu": {"capacity": capacity}}})
