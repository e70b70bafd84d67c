"""Every example runs, as a user would run it (examples/cluster_on_ray.py runs in
tests/cluster/test_compose_equivalent.py against a Ray cluster started like docker-compose's)."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, cwd: Path = ROOT) -> str:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.ray_cluster
def test_quickstart() -> None:
    out = run_example("quickstart.py")
    assert "512 of 552 tokens cached" in out
    assert "the same prompt again: 552 of 552 tokens cached" in out


@pytest.mark.ray_cluster
def test_multi_turn_chat() -> None:
    out = run_example("multi_turn_chat.py")
    turns = [
        (int(m.group(1)), int(m.group(2)))
        for m in re.finditer(r"turn \d+: prompt (\d+) tokens, (\d+) cached", out)
    ]
    assert len(turns) == 4
    assert turns[0][1] == 0
    # Each later turn reuses exactly the history: the previous prompt and its 60-token response.
    for (prev_prompt, _), (_, cached) in itertools.pairwise(turns):
        assert cached == prev_prompt + 60
    # Leaving the session ended it: its whole history (nothing was cached before it) goes first.
    assert f"ended: {turns[-1][0] + 60} tokens of {turns[-1][0] + 60} first in line" in out


def test_hf_generate() -> None:
    out = run_example("hf_generate.py")
    assert "second request: 300 cached" in out
    assert "identical to a cache-less run: True" in out


def test_analyze_workload(tmp_path: Path) -> None:
    plot = tmp_path / "hit_rate.png"
    out = run_example("analyze_workload.py", "--plot", str(plot), cwd=tmp_path)
    assert "200 prompts" in out and "recommended:" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
