"""generate() with a model whose cache keeps only a sliding window: refused before any work
when its K/V is to be stored (the window's cache cannot give back every token's K/V)."""

from __future__ import annotations

import pytest
import torch
import transformers

from kvcluster.errors import InvalidArgument
from kvcluster.integrations.hf import generate
from tests.kvcluster.integrations.test_hf import RecordingClient


def test_a_sliding_window_model_is_refused_before_contacting_the_cluster() -> None:
    # Mistral-7B-v0.1's config sets sliding_window (4096), as transformers' default does.
    config = transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=512, sliding_window=4096,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    client = RecordingClient()
    with pytest.raises(InvalidArgument, match="sliding"):
        generate(model, [1, 2, 3], client, max_new_tokens=2)
    assert client.calls == []
    # Without a store nothing needs the whole K/V back: it generates.
    assert len(generate(model, [1, 2, 3], client, max_new_tokens=2, store=False).tokens) == 2
