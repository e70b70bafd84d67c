"""Quickstart: a local 3-node cluster; store a prompt's K/V, route a longer prompt, fetch.

    python examples/quickstart.py
"""

from __future__ import annotations

import numpy as np
import torch

import kvcluster
from kvcluster.synthetic_kv import SyntheticKV


def main() -> None:
    config = kvcluster.load_config(None)  # embedded defaults: tiny-llama, 3 local nodes
    kv_model = SyntheticKV(config.model)  # K/V of the model's exact shape, causal in the prefix
    system_prompt = np.arange(1, 513)  # 512 tokens every request shares

    with kvcluster.local_cluster(config) as client:
        # 1. An engine computed the system prompt's K/V: store it where the router says.
        client.store(system_prompt, kv_model.kv(system_prompt))

        # 2. A request arrives: the system prompt plus a question.
        prompt = np.concatenate([system_prompt, np.arange(9000, 9040)])
        with client.lookup(prompt) as result:
            print(f"routed to {result.node_id}: {result.matched_tokens} of {prompt.size} tokens "
                  f"cached {result.blocks_per_tier}; {result.remaining_tokens.size} to compute")
            print(f"why: {result.explanation}")
            cached = client.fetch(result)
            assert torch.equal(cached, kv_model.kv(prompt)[:, :, : result.matched_tokens])
            print(f"fetched K/V {tuple(cached.shape)} {cached.dtype}")
            # 3. The engine computes the remaining tokens and stores them for next time.
            client.store(prompt, kv_model.kv(prompt)[:, :, result.matched_tokens :], result=result)

        with client.lookup(prompt) as again:
            print(f"the same prompt again: {again.matched_tokens} of {prompt.size} tokens cached")


if __name__ == "__main__":
    main()
