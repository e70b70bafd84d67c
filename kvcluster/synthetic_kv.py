"""Deterministic, causal K/V for token sequences, and a realistic chat workload generator.

The demo, the load test and the benchmarks need K/V tensors of a model's exact shape that
depend on the *whole prefix* (as a transformer's do), so that a wrong block, an off-by-one
offset or a prefix from another conversation shows up as a byte mismatch. Running a model for
thousands of prompts would dominate their time; :class:`SyntheticKV` computes such tensors in
a few vectorised torch operations instead. (``kvcluster.integrations.hf`` uses a real model.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvcluster.model_spec import ModelSpec

_TABLE_ROWS = 4096


class SyntheticKV:
    """``kv(tokens)`` → ``(layers, kv_components, T, kv_heads, head_dim)`` of the spec's dtype.

    Row ``t`` mixes token ``t``'s embedding with the running mean of the embeddings of
    tokens ``0..t``, so K/V at position ``t`` changes when any earlier token changes.
    """

    def __init__(self, spec: ModelSpec, seed: int = 0) -> None:
        self.spec = spec
        layers, comps, _, heads, dim = spec.page_shape(1)
        generator = torch.Generator().manual_seed(seed)
        self._width = layers * comps * heads * dim
        self._table = torch.randn((_TABLE_ROWS, self._width), generator=generator)
        self._shape = (layers, comps, heads, dim)

    def kv(self, tokens: np.ndarray | list[int]) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64) % _TABLE_ROWS)
        emb = self._table[ids]  # (T, width)
        counts = torch.arange(1, ids.numel() + 1, dtype=torch.float32).unsqueeze(1)
        mixed = 0.5 * emb + torch.cumsum(emb, dim=0) / counts
        layers, comps, heads, dim = self._shape
        kv = mixed.reshape(ids.numel(), layers, comps, heads, dim).permute(1, 2, 0, 3, 4)
        return kv.contiguous().to(self.spec.torch_dtype)


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """One request of the workload: the full prompt and the tokens the model answers with."""

    conversation: int
    turn: int
    prompt: np.ndarray
    response: np.ndarray


def chat_workload(
    *,
    conversations: int,
    turns: int,
    system_prompts: int = 4,
    system_prompt_tokens: int = 512,
    user_tokens: tuple[int, int] = (20, 120),
    response_tokens: tuple[int, int] = (20, 200),
    vocab_size: int = 32000,
    seed: int = 0,
) -> list[ChatTurn]:
    """Multi-turn chats that share a few system prompts, interleaved as a server sees them.

    Turn ``k`` of a conversation sends the system prompt, every earlier user message and
    response, and a new user message, so each turn's prompt extends the previous one.
    """
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, vocab_size, system_prompt_tokens) for _ in range(system_prompts)]
    histories = [systems[int(rng.integers(0, system_prompts))] for _ in range(conversations)]
    requests: list[ChatTurn] = []
    for turn in range(turns):
        for conversation in rng.permutation(conversations):
            user = rng.integers(0, vocab_size, int(rng.integers(*user_tokens)))
            response = rng.integers(0, vocab_size, int(rng.integers(*response_tokens)))
            prompt = np.concatenate([histories[conversation], user])
            requests.append(ChatTurn(int(conversation), turn, prompt, response))
            histories[conversation] = np.concatenate([prompt, response])
    return requests
