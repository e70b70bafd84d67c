"""Connect to an existing Ray cluster with kvcluster deployed on it (Redis as the registry).

    ray start --head --port=6380
    kvcluster up --config configs/compose.yaml --address auto
    python examples/cluster_on_ray.py --config configs/compose.yaml --address auto

docker-compose.yml runs exactly this in its client container.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import kvcluster
from kvcluster.synthetic_kv import SyntheticKV


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="the cluster's YAML configuration")
    parser.add_argument("--address", default="auto", help="Ray address (default: auto)")
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args(argv)

    config = kvcluster.load_config(args.config)
    kv_model = SyntheticKV(config.model)
    client = kvcluster.connect(config, address=args.address)
    print(f"connected: {len(client.nodes)} nodes, registry {config.registry.backend}")
    rng = np.random.default_rng(0)
    shared = rng.integers(0, config.model.vocab_size, 512)
    hits = 0
    for _ in range(args.requests):
        prompt = np.concatenate([shared, rng.integers(0, config.model.vocab_size, 64)])
        with client.lookup(prompt) as result:
            cached = client.fetch(result)
            if not torch.equal(cached, kv_model.kv(prompt)[:, :, : result.matched_tokens]):
                raise SystemExit(f"wrong K/V from {result.node_id}")
            hits += result.matched_tokens > 0
            client.store(prompt, kv_model.kv(prompt)[:, :, result.matched_tokens :], result=result)
    print(f"{hits}/{args.requests} requests reused a cached prefix")
    for node_id, stats in sorted(client.node_stats().items()):
        print(f"  {node_id}: {stats.hits} hits, {stats.misses} misses")
    client.close()
    return 0 if hits >= args.requests - 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
