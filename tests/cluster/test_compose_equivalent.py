"""docker-compose.yml's services, run as local processes on loopback.

No Docker engine runs here, so this starts what the compose file's containers run: a
redis-server, `ray start --head`, two `ray start --address` workers, `kvcluster up` and
`kvcluster status` (the head's command and health check), then the client container's
command (examples/cluster_on_ray.py and tests/cluster/test_remote_cluster.py), with the same
config file and the same KVCLUSTER_REDIS_URL variable, pointed at loopback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.conftest import RedisServer, free_port, free_port_run

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.ray_cluster]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONFIG = "configs/compose.yaml"


def run(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def wait_for_nodes(address: str, count: int, env: dict[str, str], timeout_s: float = 90) -> None:
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = run([sys.executable, "-c", probe, address], env, timeout=60)
        if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    raise AssertionError(f"{count} Ray nodes did not come up at {address}")


@pytest.fixture(scope="module")
def compose_stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "KVCLUSTER_REDIS_URL": redis_server.url,
        "PYTHONPATH": str(ROOT),
    }
    # The compose file's metrics port (9400) may be taken on a shared machine; node i serves
    # on base + i, so the three nodes need a run of three free ports.
    config_path = tmp_path_factory.mktemp("compose") / "compose.yaml"
    metrics_base = free_port_run(3)
    config_path.write_text((ROOT / CONFIG).read_text().replace("metrics_port: 9400", f"metrics_port: {metrics_base}"))
    env["KVCLUSTER_TEST_CONFIG"] = str(config_path)
    ray = str(BIN / "ray")
    common = ["--num-cpus=1", "--object-store-memory=80000000", "--block"]
    processes = [subprocess.Popen(
        [ray, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )]
    try:
        # Workers join one at a time: two raylets starting at once on one host can race.
        for expected in (2, 3):
            processes.append(subprocess.Popen(
                [ray, "start", f"--address={address}", *common],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            ))
            wait_for_nodes(address, expected, env)
        yield address, env
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def test_the_compose_commands_work_end_to_end(compose_stack: tuple[str, dict[str, str]]) -> None:
    address, env = compose_stack
    config = env["KVCLUSTER_TEST_CONFIG"]
    kvcluster = str(BIN / "kvcluster")
    up = run([kvcluster, "up", "--config", config, "--address", address, "--wait-nodes", "3"], env)
    assert up.returncode == 0, up.stderr[-2000:]
    assert "kvcluster is up: 3 node(s)" in up.stdout
    status = run([kvcluster, "status", "--config", config, "--address", address, "--min-nodes", "3"], env)
    assert status.returncode == 0, status.stderr[-2000:]
    assert status.stdout.count("node-") == 3
    example = run([sys.executable, "examples/cluster_on_ray.py", "--config", config, "--address", address], env)
    assert example.returncode == 0, example.stdout[-2000:] + example.stderr[-2000:]
    assert "registry redis" in example.stdout
    remote = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cluster/test_remote_cluster.py"],
        {**env, "KVCLUSTER_TEST_ADDRESS": address},
    )
    assert remote.returncode == 0, remote.stdout[-3000:]
    assert "2 passed" in remote.stdout
    down = run([kvcluster, "down", "--config", config, "--address", address], env)
    assert down.returncode == 0, down.stderr[-2000:]
