"""Greedy generation with a Hugging Face Llama model that reuses the cluster's cached prefix.

    python examples/hf_generate.py

A small Llama-architecture model with grouped-query attention (8 query heads, 2 KV heads) is
built from a config with seeded random weights, so nothing is downloaded. The first request
computes everything; the second shares the first's prompt and reuses its K/V from the cache,
and produces exactly the tokens a cache-less run produces.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvcluster
from kvcluster.config import KVClusterConfig
from kvcluster.integrations.hf import generate, model_spec_from_hf


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    hf_config = LlamaConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
    )
    return LlamaForCausalLM(hf_config).eval()


def main() -> int:
    model = build_model()
    spec = model_spec_from_hf(model.config, name="example-llama-gqa", dtype="float32")
    config = KVClusterConfig.from_dict({"model": spec.model_dump(), "cache": {"num_blocks": 1024}})
    rng = np.random.default_rng(0)
    document = rng.integers(0, 1000, 300)  # a shared document both questions are about
    with kvcluster.connect_local(config) as client:
        first = generate(model, np.concatenate([document, rng.integers(0, 1000, 20)]), client,
                         max_new_tokens=8)
        print(f"first request: {first.matched_tokens} cached, {first.computed_tokens} computed")
        prompt = np.concatenate([document, rng.integers(0, 1000, 25)])
        second = generate(model, prompt, client, max_new_tokens=8)
        print(f"second request: {second.matched_tokens} cached, {second.computed_tokens} computed")
        cold = generate(model, prompt, client, max_new_tokens=8, namespace="no-cache", store=False)
        same = second.tokens == cold.tokens
        print(f"generated {second.tokens}; identical to a cache-less run: {same}")
        return 0 if same and second.matched_tokens >= 300 else 1


if __name__ == "__main__":
    raise SystemExit(main())
