"""Paged attention, reference implementation in torch, and the dense attention it must equal.

:func:`paged_attention` reads K/V through block tables, the way an inference kernel does: a
batch of sequences of different lengths, each with its own block table into one shared page
pool, and queries packed back to back (``query_lens[b]`` rows for sequence ``b``)::

    query (packed)   [ s0 q0 | s1 q0 q1 q2 | s2 q0 ]          query_lens   [1, 3, 1]
    block_tables     s0: [4, 9, -]  s1: [2, -, -]  s2: [7, 1, 3]   context_lens [20, 7, 40]

Convention (as in vLLM): the K/V of the query tokens are already in the cache, so sequence
``b`` holds ``context_lens[b]`` tokens and its ``j``-th query token sits at position
``context_lens[b] - query_lens[b] + j``; it attends causally to every key at or before that
position. Decode is ``query_lens == 1`` (the last token attends to all); prefill with a cached
prefix is ``query_lens[b] > 1``. Grouped-query attention maps query head ``h`` to KV head
``h // (num_q_heads // num_kv_heads)``.

Scores, softmax and the weighted sum run in float32 whatever the cache dtype (bf16, fp16, fp8,
int8 caches are upcast), and the output has the query's dtype. The whole batch is gathered
in one indexing operation and computed with batched matmuls: no loop over tokens or blocks.
This is a correctness reference, not a fast kernel: it materialises the padded K/V.

Entries of ``block_tables`` past a sequence's last block are ignored (pad them with any
value, e.g. -1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from kvcluster.core.kv_engine import PagedKVEngine, SequenceId
from kvcluster.errors import InvalidArgument


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain attention of one sequence, computed in float64 (the reference).

    ``query`` is ``(Q, q_heads, D)``, ``key``/``value`` ``(T, kv_heads, D)`` with ``Q <= T``;
    query ``j`` sits at position ``T - Q + j``. With ``causal=False`` every query sees every
    key. Returns ``(Q, q_heads, D)`` in the query's dtype.
    """
    q_len, q_heads, dim = query.shape
    t_len, kv_heads, _ = key.shape
    if q_heads % kv_heads:
        raise InvalidArgument(f"{q_heads} query heads is not a multiple of {kv_heads} KV heads")
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    q = query.double().transpose(0, 1)  # (Hq, Q, D)
    k = key.double().repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, T, D)
    v = value.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q @ k.transpose(1, 2) * scale  # (Hq, Q, T)
    if causal:
        positions = torch.arange(t_len - q_len, t_len).unsqueeze(1)
        allowed = torch.arange(t_len).unsqueeze(0) <= positions  # (Q, T)
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # (Hq, Q, D)
    return out.transpose(0, 1).to(query.dtype)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_lens: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of a ragged batch reading K/V through block tables.

    Args:
        query: ``(total_query_tokens, q_heads, D)``, sequences packed back to back.
        key_cache, value_cache: ``(num_blocks, block_size, kv_heads, D)`` pages of one layer.
        block_tables: ``(batch, max_blocks)`` integer block ids per sequence.
        context_lens: ``(batch,)`` tokens in the cache per sequence, query tokens included.
        query_lens: ``(batch,)`` query tokens per sequence; ``None`` means one each (decode).
        scale: softmax scale; ``1 / sqrt(D)`` by default.

    Returns ``(total_query_tokens, q_heads, D)`` in the query's dtype. Raises
    :class:`InvalidArgument` naming the first inconsistent argument.
    """
    lens = _as_lengths(context_lens, "context_lens")
    batch = lens.numel()
    q_lens = torch.ones_like(lens) if query_lens is None else _as_lengths(query_lens, "query_lens")
    _check_arguments(query, key_cache, value_cache, block_tables, lens, q_lens)
    if batch == 0:
        return query.new_empty(query.shape)
    device = key_cache.device
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    q_heads, dim = query.shape[1], query.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    max_ctx = int(lens.max())
    max_q = int(q_lens.max())
    num_blocks = -(-max_ctx // block_size)

    # Gather every sequence's pages at once: (B, blocks, bs, Hkv, D) -> (B, max_ctx, Hkv, D).
    tables = block_tables[:, :num_blocks].to(device=device, dtype=torch.long).clamp(min=0)
    keys = key_cache[tables].reshape(batch, num_blocks * block_size, kv_heads, dim)[:, :max_ctx]
    values = value_cache[tables].reshape(batch, num_blocks * block_size, kv_heads, dim)[:, :max_ctx]

    # Unpack the packed queries into (B, max_q, Hq, D): row j of sequence b.
    lens_d, q_lens_d = lens.to(device), q_lens.to(device)
    seq_of_row = torch.repeat_interleave(torch.arange(batch, device=device), q_lens_d)
    starts = torch.cumsum(q_lens_d, 0) - q_lens_d
    row_in_seq = torch.arange(query.shape[0], device=device) - starts[seq_of_row]
    padded = torch.zeros(batch, max_q, q_heads, dim, dtype=torch.float32, device=device)
    padded[seq_of_row, row_in_seq] = query.to(device=device, dtype=torch.float32)

    # GQA without copying K/V: split query heads into (kv_head, group).
    q = padded.reshape(batch, max_q, kv_heads, group, dim).permute(0, 2, 3, 1, 4)  # B,Hkv,G,Q,D
    k = keys.float().permute(0, 2, 1, 3).unsqueeze(2)  # (B, Hkv, 1, T, D)
    v = values.float().permute(0, 2, 1, 3).unsqueeze(2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, Hkv, G, Q, T)

    # Query j of sequence b sits at ctx_b - q_b + j and sees keys at or before it. Padded
    # query rows (j >= q_b) see key 0 only, so their softmax stays finite; they are dropped.
    q_pos = (lens_d - q_lens_d).unsqueeze(1) + torch.arange(max_q, device=device).unsqueeze(0)
    q_pos = torch.where(torch.arange(max_q, device=device) < q_lens_d.unsqueeze(1), q_pos, 0)
    allowed = torch.arange(max_ctx, device=device).view(1, 1, -1) <= q_pos.unsqueeze(-1)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, Hkv, G, Q, D)
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, max_q, q_heads, dim)
    return out[seq_of_row, row_in_seq].to(query.dtype)


def pad_block_tables(tables: Sequence[np.ndarray], pad: int = -1) -> torch.Tensor:
    """Stack block tables of different lengths into ``(batch, longest)`` int64, padded."""
    width = max((t.size for t in tables), default=0)
    out = np.full((len(tables), max(width, 1)), pad, dtype=np.int64)
    for row, table in enumerate(tables):
        out[row, : table.size] = table
    return torch.from_numpy(out)


def engine_attention(
    engine: PagedKVEngine,
    layer: int,
    seq_ids: Sequence[SequenceId],
    query: torch.Tensor,
    query_lens: Sequence[int] | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`paged_attention` over the engine's pages for ``layer`` and ``seq_ids``.

    The queries' own K/V must already be appended (they are the last ``query_lens[b]``
    tokens of each sequence). MLA caches (one latent component) are not supported here.
    """
    if engine.spec.kv_components != 2:
        raise InvalidArgument("engine_attention needs separate K and V (not an MLA latent cache)")
    if isinstance(layer, bool) or not 0 <= layer < engine.spec.num_layers:
        raise InvalidArgument(f"layer {layer!r} outside [0, {engine.spec.num_layers})")
    tables = pad_block_tables([engine.block_table(s) for s in seq_ids])
    lens = torch.tensor([engine.num_tokens(s) for s in seq_ids], dtype=torch.long)
    q_lens = None if query_lens is None else torch.tensor(list(query_lens), dtype=torch.long)
    pages = engine.pages.pages  # (N, L, C, bs, H, D); the slices below are views
    return paged_attention(
        query, pages[:, layer, 0], pages[:, layer, 1], tables, lens, q_lens, scale=scale
    )


def _as_lengths(values: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.is_floating_point():
        raise InvalidArgument(f"{name} must be a 1-D integer tensor, got {values!r}")
    return values.to(dtype=torch.long, device="cpu")


def _check_arguments(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    q_lens: torch.Tensor,
) -> None:
    if query.dim() != 3:
        raise InvalidArgument(f"query must be (tokens, q_heads, head_dim), got {tuple(query.shape)}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise InvalidArgument(
            f"key_cache and value_cache must both be (num_blocks, block_size, kv_heads, "
            f"head_dim), got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    kv_heads, dim = key_cache.shape[2], key_cache.shape[3]
    if query.shape[2] != dim:
        raise InvalidArgument(f"query head_dim {query.shape[2]} != cache head_dim {dim}")
    if query.shape[1] % kv_heads:
        raise InvalidArgument(
            f"{query.shape[1]} query heads is not a multiple of {kv_heads} KV heads (GQA)"
        )
    batch = lens.numel()
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.is_floating_point():
        raise InvalidArgument(
            f"block_tables must be an integer (batch={batch}, max_blocks) tensor, got "
            f"{tuple(block_tables.shape)} {block_tables.dtype}"
        )
    if q_lens.numel() != batch:
        raise InvalidArgument(f"query_lens has {q_lens.numel()} entries for a batch of {batch}")
    if batch and (int(q_lens.min()) < 1 or bool((q_lens > lens).any())):
        raise InvalidArgument(
            f"every query_lens entry must be in [1, context_len]; query_lens={q_lens.tolist()}, "
            f"context_lens={lens.tolist()}"
        )
    if int(q_lens.sum()) != query.shape[0]:
        raise InvalidArgument(
            f"query has {query.shape[0]} rows but query_lens sum to {int(q_lens.sum())}"
        )
    if batch:
        block_size = key_cache.shape[1]
        needed = -(-int(lens.max()) // block_size)
        if needed > block_tables.shape[1]:
            raise InvalidArgument(
                f"block_tables has {block_tables.shape[1]} columns; the longest context needs {needed}"
            )
        used = torch.arange(block_tables.shape[1]).unsqueeze(0) < (
            (lens + block_size - 1) // block_size
        ).unsqueeze(1)
        live = block_tables.cpu()[used]
        if live.numel() and (int(live.min()) < 0 or int(live.max()) >= key_cache.shape[0]):
            raise InvalidArgument(
                f"block_tables reference blocks outside [0, {key_cache.shape[0]})"
            )
