"""Memory calculator and ``kvcluster plan``: figures hand-computed from published configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcluster.cli import main
from kvcluster.config import KVClusterConfig
from kvcluster.errors import InvalidArgument
from kvcluster.memory_calculator import (
    FreeMemory,
    blocks_in,
    blocks_per_sequence,
    bytes_per_block,
    bytes_per_token,
    bytes_per_token_all_ranks,
    check_load,
    disk_free_bytes,
    format_bytes,
    gpu_free_bytes,
    host_free_bytes,
    max_concurrent_sequences,
    plan_for_model,
    plan_from_config,
    render,
)
from kvcluster.model_spec import PRESETS, ModelSpec

GiB = 2**30

# layers * (K and V) * kv_heads * head_dim * 2 bytes (bf16), from each model's config.json.
HAND_COMPUTED = {
    "llama-3-8b": 32 * 2 * 8 * 128 * 2,  # 131,072
    "llama-3-70b": 80 * 2 * 8 * 128 * 2,  # 327,680
    "mistral-7b": 32 * 2 * 8 * 128 * 2,  # 131,072
    "qwen2.5-7b": 28 * 2 * 4 * 128 * 2,  # 57,344
    "deepseek-v3": 61 * (512 + 64) * 2,  # MLA: one latent + rope key per layer = 70,272
    "tiny-llama": 2 * 2 * 2 * 16 * 4,  # float32
}


def with_(spec: ModelSpec, **updates: object) -> ModelSpec:
    return ModelSpec.model_validate({**spec.model_dump(), **updates})


@pytest.mark.parametrize(("name", "expected"), sorted(HAND_COMPUTED.items()))
def test_presets_match_published_configs(name: str, expected: int) -> None:
    spec = PRESETS[name]
    assert bytes_per_token(spec) == expected
    assert bytes_per_block(spec, 16) == 16 * expected


def test_headline_figures() -> None:
    assert bytes_per_token(PRESETS["llama-3-8b"]) == 131_072
    assert bytes_per_token(PRESETS["deepseek-v3"]) == 70_272


@pytest.mark.parametrize(
    ("dtype", "factor"),
    [("float32", 2.0), ("float16", 1.0), ("bfloat16", 1.0), ("fp8_e4m3", 0.5), ("fp8_e5m2", 0.5), ("int8", 0.5)],
)
def test_dtype_scales_bytes(dtype: str, factor: float) -> None:
    assert bytes_per_token(with_(PRESETS["llama-3-8b"], dtype=dtype)) == int(131_072 * factor)
    assert bytes_per_token(with_(PRESETS["deepseek-v3"], dtype=dtype)) == int(70_272 * factor)


@pytest.mark.parametrize(
    ("tp", "per_rank", "all_ranks"),
    [
        (1, 327_680, 327_680),
        (2, 80 * 2 * 4 * 128 * 2, 327_680),
        (8, 80 * 2 * 1 * 128 * 2, 327_680),
        # 16 ranks, 8 KV heads: every rank keeps one (replicated) head.
        (16, 80 * 2 * 1 * 128 * 2, 16 * 80 * 2 * 1 * 128 * 2),
    ],
)
def test_tensor_parallel_splits_kv_heads(tp: int, per_rank: int, all_ranks: int) -> None:
    spec = with_(PRESETS["llama-3-70b"], tensor_parallel=tp)
    assert bytes_per_token(spec) == per_rank
    assert bytes_per_token_all_ranks(spec) == all_ranks


def test_mla_latent_is_replicated_across_ranks() -> None:
    spec = with_(PRESETS["deepseek-v3"], tensor_parallel=8)
    assert bytes_per_token(spec) == 70_272
    assert bytes_per_token_all_ranks(spec) == 8 * 70_272


def test_blocks_sequences_and_loads() -> None:
    spec = PRESETS["llama-3-8b"]  # 2 MiB per block of 16
    assert blocks_in(spec, 16, 80 * GiB) == 40_960
    assert blocks_in(spec, 16, 80 * GiB - 1) == 40_959
    assert blocks_in(spec, 16, 0) == 0
    assert blocks_per_sequence(32_768, 16) == 2048
    assert blocks_per_sequence(1, 16) == 1
    assert blocks_per_sequence(17, 16) == 2
    assert max_concurrent_sequences(40_960, 32_768, 16) == 20
    assert max_concurrent_sequences(40_960, 131_072, 16) == 5
    ok = check_load(spec, 16, 40_960, 20, 32_768)
    assert ok.fits and ok.blocks_needed == 40_960 and ok.shortfall_blocks == 0
    assert ok.bytes_needed == 80 * GiB
    short = check_load(spec, 16, 40_960, 21, 32_768)
    assert not short.fits and short.shortfall_blocks == 2048
    with pytest.raises(InvalidArgument):
        blocks_in(spec, 0, GiB)
    with pytest.raises(InvalidArgument):
        blocks_in(spec, 16, -1)
    with pytest.raises(InvalidArgument):
        blocks_per_sequence(0, 16)
    with pytest.raises(InvalidArgument):
        check_load(spec, 16, 10, -1, 16)


def test_plan_for_model() -> None:
    plan = plan_for_model(PRESETS["qwen2.5-7b"], 24 * GiB, context=8192, sequences=100)
    per_block = 57_344 * 16
    assert plan.bytes_per_block == per_block
    assert plan.engine_blocks == 24 * GiB // per_block == 28_086
    assert plan.blocks_per_sequence == 512
    assert plan.engine_sequences == 54
    assert plan.load is not None and not plan.load.fits
    assert plan.load.blocks_needed == 51_200


def fake_free(gpu: int = 10 * GiB, host: int = 20 * GiB, disk: int = 100 * GiB) -> FreeMemory:
    return FreeMemory(gpu=lambda device: gpu, host=lambda: host, disk=lambda paths: disk)


def test_plan_from_config_resolves_fractions(tmp_path: Path) -> None:
    config = KVClusterConfig.from_dict({
        "model": "llama-3-8b",
        "cache": {"block_size": 32, "max_context": 8192},
        "tiers": {
            "gpu": {"capacity": "50%"},
            "cpu": {"capacity": "4GiB"},
            "nvme": {"enabled": True, "paths": [str(tmp_path)], "capacity": "10%"},
        },
    })
    plan = plan_from_config(config, free_memory=fake_free(), sequences=10)
    per_block = 131_072 * 32
    assert [t.name for t in plan.tiers] == ["gpu", "cpu", "nvme"]
    assert [t.capacity_bytes for t in plan.tiers] == [5 * GiB, 4 * GiB, 10 * GiB]
    assert [t.blocks for t in plan.tiers] == [5 * GiB // per_block, 1024, 2560]
    assert plan.tiers[0].source == "50% of 10.0 GiB free"
    assert plan.context == 8192
    assert plan.blocks_per_sequence == 256
    assert plan.engine_blocks == 1280
    assert plan.engine_sequences == 5
    assert plan.load is not None and not plan.load.fits
    assert plan.load_all_tiers is not None and plan.load_all_tiers.fits
    text = render(plan)
    assert "DOES NOT FIT" in text and "across all tiers (4,864 blocks): fits" in text


def test_plan_from_config_num_blocks_and_overrides() -> None:
    config = KVClusterConfig.from_dict({"model": "tiny-llama", "cache": {"num_blocks": 100}})
    plan = plan_from_config(config, free_memory=fake_free(), context=160, gpu_bytes=GiB)
    assert plan.engine_blocks == 100
    assert plan.engine_sequences == 10
    assert plan.tiers[0].capacity_bytes == GiB
    assert "cache.num_blocks = 100" in render(plan)


def test_free_memory_probes(tmp_path: Path) -> None:
    assert host_free_bytes() > 0
    assert gpu_free_bytes("cpu") > 0
    one = disk_free_bytes((str(tmp_path),))
    assert one > 0
    # The same filesystem counts once; a path that does not exist yet counts its parent's.
    assert disk_free_bytes((str(tmp_path), str(tmp_path / "not" / "yet"))) == pytest.approx(one, rel=0.01)


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(80 * GiB) == "80.0 GiB"
    assert format_bytes(3 * 2**40) == "3.0 TiB"


# --- the command -----------------------------------------------------------------------------


def test_cli_plan_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "Llama-3-8B"]) == 0
    out = capsys.readouterr().out
    assert "Model llama-3-8b: 32 layers" in out
    assert "131,072 B" in out
    assert "2,097,152 B" in out
    lines = [line.split() for line in out.splitlines()]
    assert ["gpu", "80.0", "GiB", "40,960", "655,360", "20", "budget"] in lines


def test_cli_plan_load_that_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["plan", "--model", "llama-3-70b", "--tp", "8", "--memory", "40GiB",
               "--context", "8192", "--sequences", "200"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "40,960 B" in out  # per rank under TP 8
    assert "200 x 8,192 tokens = 102,400 blocks" in out
    assert "DOES NOT FIT in the engine pool of 65,536 blocks (short by 36,864 blocks)" in out


def test_cli_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "deepseek-v3", "--dtype", "fp8_e4m3", "--json",
                 "--block-size", "64", "--sequences", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bytes_per_token"] == 35_136
    assert data["bytes_per_block"] == 35_136 * 64
    assert data["tiers"][0]["blocks"] == 80 * GiB // (35_136 * 64)
    assert data["load"]["fits"] is True


def test_cli_plan_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: mistral-7b\ncache:\n  max_context: 4096\n"
        "tiers:\n  gpu:\n    capacity: 2GiB\n  cpu:\n    capacity: 1GiB\n"
    )
    assert main(["plan", "--config", str(path)]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["gpu", "2.0", "GiB", "1,024", "16,384", "4", "2.0", "GiB"] in lines
    assert ["cpu", "1.0", "GiB", "512", "8,192", "2", "1.0", "GiB"] in lines
    assert ["total", "3.0", "GiB", "1,536", "24,576", "6"] in lines


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan"], "give --config FILE or --model NAME"),
        (["plan", "--model", "gpt-9"], "unknown model preset 'gpt-9'"),
        (["plan", "--model", "llama-3-8b", "--memory", "lots"], "--memory"),
        (["plan", "--model", "llama-3-8b", "--dtype", "fp4"], "dtype"),
        (["plan", "--model", "llama-3-8b", "--context", "0"], "--context must be positive"),
        (["plan", "--config", "/nonexistent/x.yaml"], "cannot read"),
    ],
)
def test_cli_plan_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err
