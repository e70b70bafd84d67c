"""A multi-turn chat: each turn reuses everything cached by the turns before it; ending it
tells its node what it may evict first.

    python examples/multi_turn_chat.py
"""

from __future__ import annotations

import numpy as np

import kvcluster
from kvcluster.synthetic_kv import SyntheticKV


def main(turns: int = 4) -> None:
    config = kvcluster.load_config(None)
    kv_model = SyntheticKV(config.model)
    rng = np.random.default_rng(7)
    system_prompt = rng.integers(0, config.model.vocab_size, 256)

    with kvcluster.local_cluster(config) as client:
        with client.session("conversation-1", namespace="tenant-a") as chat:
            chat.history = system_prompt.astype(np.int64)
            for turn in range(turns):
                user = rng.integers(0, config.model.vocab_size, 30)
                result = chat.prompt(user)
                response = rng.integers(0, config.model.vocab_size, 60)
                # The engine computes the uncached prompt tokens and the response.
                full = np.concatenate([result.tokens, response])
                kv_new = kv_model.kv(full)[:, :, result.matched_tokens :]
                chat.complete(result, response, kv_new)
                print(f"turn {turn}: prompt {result.tokens.size} tokens, {result.matched_tokens} cached "
                      f"({result.hit_ratio:.0%}) on {result.node_id}")
        # Leaving the block ended the conversation: its node evicts what only it cached first.
        stats = client.node_handle(chat.node_id).call("stats") if chat.node_id else None
        if stats is not None:
            print(f"ended: {stats.demoted_tokens} tokens of {chat.history.size} first in line for eviction "
                  f"on {chat.node_id}")

if __name__ == "__main__":
    main()
