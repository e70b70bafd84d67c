"""Paged attention reads K/V through block tables and equals dense attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcluster.core.kv_engine import PagedKVEngine
from kvcluster.core.paged_attention import (
    dense_attention,
    engine_attention,
    pad_block_tables,
    paged_attention,
)
from kvcluster.errors import InvalidArgument
from kvcluster.model_spec import ModelSpec

BS = 4


def scattered_cache(
    lengths: list[int], kv_heads: int, dim: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Dense K/V per sequence, written into pages in a shuffled block order."""
    g = torch.Generator().manual_seed(seed)
    blocks_each = [-(-n // BS) for n in lengths]
    total = sum(blocks_each) + 3
    perm = torch.randperm(total, generator=g).tolist()
    key_cache = torch.randn(total, BS, kv_heads, dim, generator=g).to(dtype)  # garbage fill
    value_cache = torch.randn(total, BS, kv_heads, dim, generator=g).to(dtype)
    keys, values, tables = [], [], []
    for n, nb in zip(lengths, blocks_each):
        ids, perm = perm[:nb], perm[nb:]
        k = torch.randn(n, kv_heads, dim, generator=g).to(dtype)
        v = torch.randn(n, kv_heads, dim, generator=g).to(dtype)
        for i, block in enumerate(ids):
            rows = slice(i * BS, min(n, (i + 1) * BS))
            count = rows.stop - rows.start
            key_cache[block, :count] = k[rows]
            value_cache[block, :count] = v[rows]
        keys.append(k)
        values.append(v)
        tables.append(np.array(ids, dtype=np.int64))
    return key_cache, value_cache, pad_block_tables(tables), keys, values


def reference(
    query: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], q_lens: list[int]
) -> torch.Tensor:
    outs, start = [], 0
    for k, v, q in zip(keys, values, q_lens):
        outs.append(dense_attention(query[start : start + q], k, v))
        start += q
    return torch.cat(outs)


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize(
    ("lengths", "q_lens"),
    [
        ([1, 5, 17, 33], [1, 1, 1, 1]),  # decode, ragged
        ([7, 16, 40], [7, 3, 10]),  # prefill: whole, with cached prefix, chunk
        ([12], [12]),
        ([4, 9], [1, 9]),  # mixed decode + prefill
    ],
)
def test_fp32_equals_dense_within_1e_5(
    q_heads: int, kv_heads: int, lengths: list[int], q_lens: list[int]
) -> None:
    dim = 8
    key_cache, value_cache, tables, keys, values = scattered_cache(lengths, kv_heads, dim, torch.float32)
    query = torch.randn(sum(q_lens), q_heads, dim, generator=torch.Generator().manual_seed(9))
    out = paged_attention(
        query, key_cache, value_cache, tables, torch.tensor(lengths), torch.tensor(q_lens)
    )
    expected = reference(query, keys, values, q_lens)
    assert out.dtype == torch.float32 and out.shape == query.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_decode_is_the_default_query_lens() -> None:
    lengths = [3, 20]
    key_cache, value_cache, tables, keys, values = scattered_cache(lengths, 2, 8, torch.float32)
    query = torch.randn(2, 4, 8)
    out = paged_attention(query, key_cache, value_cache, tables, torch.tensor(lengths))
    torch.testing.assert_close(out, reference(query, keys, values, [1, 1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_its_tolerance(dtype: torch.dtype) -> None:
    lengths, q_lens = [9, 30, 64], [1, 6, 64]
    key_cache, value_cache, tables, keys, values = scattered_cache(lengths, 2, 16, dtype)
    query = torch.randn(sum(q_lens), 8, 16).to(dtype)
    out = paged_attention(
        query, key_cache, value_cache, tables, torch.tensor(lengths), torch.tensor(q_lens)
    )
    assert out.dtype == dtype
    expected = reference(query, keys, values, q_lens)  # float64 math on the same inputs
    torch.testing.assert_close(out, expected)  # torch's default tolerance for the dtype


def test_causal_mask_matters() -> None:
    """Prefill queries must not see later keys: non-causal dense attention differs."""
    key_cache, value_cache, tables, keys, values = scattered_cache([10], 1, 4, torch.float32)
    query = torch.randn(10, 2, 4)
    out = paged_attention(query, key_cache, value_cache, tables, torch.tensor([10]), torch.tensor([10]))
    assert not torch.allclose(out, dense_attention(query, keys[0], values[0], causal=False))
    # The last query sees every key, so it agrees with non-causal attention.
    torch.testing.assert_close(
        out[-1], dense_attention(query, keys[0], values[0], causal=False)[-1], atol=1e-5, rtol=1e-5
    )


def test_through_the_engine_block_tables() -> None:
    spec = ModelSpec(
        name="attn", num_layers=2, num_attention_heads=8, num_kv_heads=2, head_dim=8,
        hidden_size=64, intermediate_size=64, vocab_size=100, dtype="float32",
    )
    engine = PagedKVEngine(spec, block_size=4, num_blocks=40)
    g = torch.Generator().manual_seed(3)
    seqs, kvs = [], []
    for n in (5, 13, 22):
        kv = torch.randn(2, 2, n, 2, 8, generator=g)
        seq = engine.create_sequence(list(range(n)), kv)
        seqs.append(seq)
        kvs.append(kv)
    # Fork + copy-on-write so that tables are non-contiguous and shared.
    child = engine.fork(seqs[1])
    extra = torch.randn(2, 2, 3, 2, 8, generator=g)
    engine.append(child, [1, 2, 3], extra)
    seqs.append(child)
    kvs.append(torch.cat([kvs[1], extra], dim=2))
    q_lens = [1, 2, 22, 3]
    query = torch.randn(sum(q_lens), 8, 8, generator=g)
    for layer in (0, 1):
        out = engine_attention(engine, layer, seqs, query, q_lens)
        expected = reference(
            query, [kv[layer, 0] for kv in kvs], [kv[layer, 1] for kv in kvs], q_lens
        )
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_fp8_cache_is_upcast() -> None:
    lengths = [6, 11]
    key_cache, value_cache, tables, keys, values = scattered_cache(lengths, 1, 8, torch.float8_e4m3fn)
    query = torch.randn(2, 2, 8)
    out = paged_attention(query, key_cache, value_cache, tables, torch.tensor(lengths))
    expected = reference(query, keys, values, [1, 1])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_pad_block_tables() -> None:
    table = pad_block_tables([np.array([3, 1]), np.array([], dtype=np.int64), np.array([7])])
    assert table.tolist() == [[3, 1], [-1, -1], [7, -1]]
    assert pad_block_tables([]).shape == (0, 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"query": torch.randn(2, 4)}, "query must be"),
        ({"query": torch.randn(2, 3, 8)}, "multiple of 2 KV heads"),
        ({"query": torch.randn(2, 4, 6)}, "head_dim 6"),
        ({"query": torch.randn(3, 4, 8)}, "query has 3 rows"),
        ({"value_cache": torch.randn(10, 4, 2, 4)}, "value_cache"),
        ({"block_tables": torch.zeros(2, 1, dtype=torch.long)}, "needs 2"),
        ({"block_tables": torch.zeros(3, 2, dtype=torch.long)}, "batch=2"),
        ({"block_tables": torch.tensor([[0, 10], [1, 2]])}, "outside"),
        ({"context_lens": torch.tensor([5.0, 6.0])}, "context_lens"),
        ({"query_lens": torch.tensor([0, 2])}, "query_lens"),
        ({"query_lens": torch.tensor([1, 7])}, "query_lens"),
        ({"query_lens": torch.tensor([1, 1, 1])}, "3 entries"),
    ],
)
def test_bad_arguments_are_named(change: dict[str, torch.Tensor], message: str) -> None:
    args: dict[str, torch.Tensor] = {
        "query": torch.randn(2, 4, 8),
        "key_cache": torch.randn(10, 4, 2, 8),
        "value_cache": torch.randn(10, 4, 2, 8),
        "block_tables": torch.tensor([[0, 1], [2, -1]]),
        "context_lens": torch.tensor([5, 4]),
        "query_lens": torch.tensor([1, 1]),
    }
    args.update(change)
    with pytest.raises(InvalidArgument, match=message):
        paged_attention(**args)  # type: ignore[arg-type]


def test_empty_batch() -> None:
    out = paged_attention(
        torch.randn(0, 4, 8), torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8),
        torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long),
    )
    assert out.shape == (0, 4, 8)


@pytest.mark.gpu
def test_on_cuda_equals_dense() -> None:
    lengths, q_lens = [5, 18], [1, 4]
    key_cache, value_cache, tables, keys, values = scattered_cache(lengths, 2, 8, torch.float32)
    query = torch.randn(5, 4, 8)
    out = paged_attention(
        query.cuda(), key_cache.cuda(), value_cache.cuda(), tables.cuda(),
        torch.tensor(lengths), torch.tensor(q_lens),
    )
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), reference(query, keys, values, q_lens), atol=1e-5, rtol=1e-5)
