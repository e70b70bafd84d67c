"""Bad command-line arguments end with a one-line error and exit status 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import kvcluster.deploy
from kvcluster.cli import main


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command gets as far as Ray."""

    def reached(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the command reached Ray despite a bad argument")

    monkeypatch.setattr(kvcluster.deploy, "deploy", reached)
    monkeypatch.setattr(kvcluster.deploy, "ensure_ray", reached)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["up", "--wait-nodes", "-1"], "--wait-nodes"),
        (["up", "--wait-nodes", "2", "--timeout", "-5"], "--timeout"),
        (["up", "--wait-nodes", "2", "--timeout", "nan"], "--timeout"),
        (["status", "--min-nodes", "-1"], "--min-nodes"),
    ],
)
def test_cluster_commands_check_their_numbers_before_ray(
    argv: list[str], message: str, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kvcluster {argv[0]}: error: ") and message in err


def test_a_bad_redis_url_in_the_environment_is_a_clean_error(
    monkeypatch: pytest.MonkeyPatch, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KVCLUSTER_REDIS_URL", "http://redis:6379")
    assert main(["status"]) == 2
    assert "KVCLUSTER_REDIS_URL" in capsys.readouterr().err


def test_analyze_json_to_an_unwritable_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workload = tmp_path / "w.jsonl"
    workload.write_text("".join(json.dumps({"tokens": [1, 2, 3, i]}) + "\n" for i in range(4)))
    target = tmp_path / "missing" / "out.json"
    assert main(["analyze", str(workload), "--no-plot", "--json", str(target)]) == 2
    assert f"cannot write the analysis to {target}" in capsys.readouterr().err


def test_plan_tp_that_does_not_split_the_kv_heads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-3-8b", "--tp", "3"]) == 2
    assert "tensor_parallel (3) must divide num_kv_heads (8)" in capsys.readouterr().err
