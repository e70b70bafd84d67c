"""Load: 128 client threads doing route / fetch / store against a 3-node cluster, and 1,000
leased sequences held at once. Nothing may fail, leak a lease or lose a block."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from kvcluster.client import KVClient
from kvcluster.config import KVClusterConfig
from kvcluster.connection import connect
from kvcluster.deploy import deploy, undeploy
from kvcluster.synthetic_kv import SyntheticKV
from tests.cluster.conftest import wait_until

pytestmark = [pytest.mark.ray_cluster, pytest.mark.slow]

NAMESPACE = "kvc-test-load"
THREADS = 128
DURATION_S = float(os.environ.get("KVCLUSTER_LOAD_TEST_SECONDS", "60"))


def make_config() -> KVClusterConfig:
    return KVClusterConfig.from_dict({
        "cache": {"num_blocks": 4096},
        "tiers": {"cpu": {"capacity": "32MiB"}},
        "registry": {"index_stride_blocks": 4},
        "cluster": {"ray_namespace": NAMESPACE, "lease_ttl_s": 120, "actor_max_concurrency": 32},
    })


@pytest.fixture(scope="module")
def client(ray_cluster: object) -> Iterator[KVClient]:
    deploy(make_config())
    kv_client = connect(make_config())
    try:
        yield kv_client
    finally:
        kv_client.close()
        undeploy(NAMESPACE)


def test_128_threads_for_a_minute(client: KVClient) -> None:
    config = make_config()
    kv_model = SyntheticKV(config.model)
    rng = np.random.default_rng(3)
    system_prompts = [rng.integers(0, config.model.vocab_size, 256) for _ in range(8)]
    errors: list[BaseException] = []
    latencies: list[float] = []
    wrong_kv = []
    lock = threading.Lock()

    def worker(seed: int, deadline: float, timed: bool) -> None:
        local = np.random.default_rng(seed)
        mine: list[float] = []
        try:
            while time.monotonic() < deadline:
                prompt = np.concatenate([
                    system_prompts[int(local.integers(0, 8))],
                    local.integers(0, config.model.vocab_size, int(local.integers(8, 64))),
                ])
                start = time.perf_counter()
                with client.lookup(prompt) as result:
                    mine.append(time.perf_counter() - start)
                    cached = client.fetch(result)
                    expected = kv_model.kv(prompt)
                    if not torch.equal(cached, expected[:, :, : result.matched_tokens]):
                        wrong_kv.append(result.node_id)
                    client.store(prompt, expected[:, :, result.matched_tokens :], result=result)
        except BaseException as exc:  # collected and asserted on below
            with lock:
                errors.append(exc)
        if timed:
            with lock:
                latencies.extend(mine)

    def burst(seconds: float, *, timed: bool) -> None:
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=worker, args=(i, deadline, timed)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    torch.set_num_threads(1)  # 128 threads of torch ops must not oversubscribe 2 cores
    # The first burst of 128 threads on a fresh cluster sometimes runs 5-10x slower on this
    # shared VM (a p99 of 50 s was seen once, 1-2 s otherwise), so a short one warms up first:
    # its errors, wrong K/V and leaks count like the minute's; only its latencies do not.
    burst(min(5.0, DURATION_S / 4), timed=False)
    burst(DURATION_S, timed=True)
    assert not errors, repr(errors[:3])
    assert not wrong_kv, f"{len(wrong_kv)} wrong K/V fetches"
    assert len(latencies) >= THREADS
    p99 = float(np.percentile(latencies, 99))
    # A bound, not a latency figure (those are bench_cluster's): no request may wait anywhere
    # near a lease's lifetime (120 s here). Typically 1-2 s; on a starved 2-core host the
    # embedded registry actor can miss its 2 s timeouts, stores then wait on their publishes,
    # and once a p99 of 50 s was seen, with no error and nothing leaked.
    assert p99 < 60.0, f"route_and_lookup p99 {p99:.3f} s under load"
    # Every pool back to its baseline: no lease, no sequence, ref counts consistent. A pull's
    # source lease is released without waiting for the answer, so give that a moment (a
    # leaked lease would stay for the whole 120 s lease lifetime).
    wait_until(lambda: not any(s.leases for s in client.node_stats().values()), timeout_s=10)
    for node_id, stats in client.node_stats().items():
        assert stats.leases == 0, node_id
        assert stats.sequences == 0, node_id
    for node_id in client.nodes:
        assert client._nodes[node_id].call("check_invariants")


def test_a_thousand_concurrent_leased_sequences(client: KVClient) -> None:
    config = make_config()
    kv_model = SyntheticKV(config.model, seed=5)
    rng = np.random.default_rng(5)
    # 80 tokens = 5 blocks: past the registry's 4-block stride, so routing finds the holder.
    prompts = [rng.integers(0, config.model.vocab_size, 80) for _ in range(1000)]
    for prompt in prompts:
        client.store(prompt, kv_model.kv(prompt))
    results = [client.route_and_lookup(prompt) for prompt in prompts]
    try:
        assert all(r.matched_tokens == 80 for r in results)
        assert sum(s.leases for s in client.node_stats().values()) == 1000
        assert len({r.node_id for r in results}) == 3
    finally:
        for result in results:
            client.release(result)
    assert sum(s.leases for s in client.node_stats().values()) == 0
