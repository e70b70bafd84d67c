"""Small builders shared by the prefix-cache tests (index, eviction, sessions, stateful)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvcluster.core.block_pool import BlockPool
from kvcluster.core.eviction import make_policy
from kvcluster.core.prefix_index import PrefixIndex
from kvcluster.core.prefix_records import EvictedBlock


def causal_kv(tokens: Any, layers: int = 1, heads: int = 1, dim: int = 2) -> torch.Tensor:
    """K/V ``(layers, 2, T, heads, dim)`` where row t depends on tokens[0..t] (a rolling hash,
    exact in float32) and on t, so a prefix's K/V are the first rows of any extension's and a
    wrong, shifted or foreign block never reads back equal."""
    values = [int(t) for t in np.asarray(tokens).reshape(-1)]
    rows = np.empty((len(values), dim), dtype=np.float32)
    h = 7
    for t, token in enumerate(values):
        h = (h * 31 + token + 1) % 1_000_003
        rows[t] = [h + 0.25 * j for j in range(dim)]
        rows[t, -1] = t
    k = torch.from_numpy(rows).reshape(1, 1, len(values), 1, dim).expand(layers, 1, len(values), heads, dim)
    return torch.cat([k, k + 0.5], dim=1).contiguous()


@dataclass
class FakeClock:
    """A monotonic clock the test moves by hand."""

    now: float = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@dataclass
class Cache:
    """A pool, an index over it, its clock and every block the index reported evicted."""

    pool: BlockPool
    index: PrefixIndex
    clock: FakeClock
    evicted: list[EvictedBlock] = field(default_factory=list)

    @property
    def bs(self) -> int:
        return self.index.block_size

    def store(self, tokens: Any, namespace: str = "default", *, keep: bool = False) -> np.ndarray:
        """Allocate blocks for ``tokens``, insert them, and (unless ``keep``) drop the caller's
        references as an engine does when the sequence ends. Returns the block table."""
        tokens = np.asarray(tokens, dtype=np.int64)
        table = self.pool.allocate(-(-tokens.size // self.bs))
        assert table is not None, "test pool too small"
        self.index.insert(tokens, table, namespace)
        if not keep:
            self.pool.decref(table)
        return table

    def evicted_tokens(self) -> list[list[int]]:
        return [e.tokens.tolist() for e in self.evicted]


def make_cache(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    policy: str = "lru",
    ttl_s: float | None = None,
    **kwargs: Any,
) -> Cache:
    clock = FakeClock()
    pool = BlockPool(num_blocks)
    evicted: list[EvictedBlock] = []
    index = PrefixIndex(
        pool,
        block_size,
        policy=make_policy(policy, ttl_s=ttl_s, clock=clock),
        clock=clock,
        on_evict=evicted.append,
        **kwargs,
    )
    return Cache(pool, index, clock, evicted)


def snapshot(cache: Cache) -> tuple[Any, ...]:
    """Everything observable about the index and its pool, for 'state unchanged' checks."""
    index = cache.index
    trees = []
    for namespace in sorted(index.namespaces()):
        root = index._roots[namespace]
        stack = [root]
        nodes = []
        while stack:
            node = stack.pop()
            nodes.append(
                (node.node_id, node.start, node.end, node.key, node.path_blocks, node.terminal,
                 node.pin_count, node.freq, node.last_access)
            )
            stack.extend(node.children[k] for k in sorted(node.children))
        trees.append((namespace, nodes))
    order = [n.node_id for n in index.policy.order()]
    return (
        trees,
        order,
        index.stats(),
        index.pins(),
        cache.pool.ref_counts_view().tolist(),
        cache.pool.num_free,
    )
