"""Batch pre-flight analysis: how much of a workload a prefix cache would serve, and at what size.

Two walks over the prompts, both linear in the total number of tokens (a radix-trie walk per
prompt, ``memcmp`` per edge; never a comparison of prompt pairs):

1. A counting trie (:class:`PromptTrie`) gives the total and unique tokens (a token is
   unique the first time its prefix appears: exactly what an infinite cache misses), the
   dedup ratio, and the most valuable shared prefixes with the number of prompts sharing them.
2. A replay through the *real* :class:`~kvcluster.core.prefix_index.PrefixIndex` and eviction
   policy for every (cache size, policy): each prompt is looked up, its reused prefix leased,
   room made by the policy's evictions, and its new blocks inserted, on a
   :class:`~kvcluster.core.block_pool.BlockPool` sized to the cache (no K/V pages needed). The
   replayed hit rate is the fraction of prompt tokens served from the cache.

The recommendation is the smallest evaluated size whose best policy reaches ``target`` (90%)
of the infinite-cache hit rate. A block trace can be analysed at block granularity (each id
stands for 512 tokens, the replay's block is one id) or expanded into tokens.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from kvcluster.core.block_pool import BlockPool
from kvcluster.core.eviction import make_policy, parse_policy_name
from kvcluster.core.prefix_index import PrefixIndex
from kvcluster.core.radix_node import ID_BYTES, ids_from_bytes
from kvcluster.core.radix_walk import common_prefix
from kvcluster.core.workload_reader import Workload
from kvcluster.errors import InvalidArgument

Int64Array = npt.NDArray[np.int64]
#: ``progress(done, total)``: work units (tokens walked) done so far of the analysis' total.
Progress = Callable[[int, int], None]

#: Default cache sizes, as fractions of what a cache holding every prompt would use.
DEFAULT_SIZE_FRACTIONS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


@dataclass(frozen=True, slots=True)
class SharedPrefix:
    """A prefix ``tokens`` long that ``prompts`` prompts start with (the longest prefix those
    prompts share); ``saved_tokens`` = ``(prompts - 1) * tokens`` a cache saves on it."""

    tokens: int
    prompts: int
    saved_tokens: int
    preview: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CachePoint:
    """The replayed result of one cache size under one policy."""

    cache_tokens: int
    cache_blocks: int
    policy: str
    hit_tokens: int
    hit_rate: float
    evicted_blocks: int


@dataclass(frozen=True, slots=True)
class WorkloadAnalysis:
    """What a prefix cache would do with a batch of prompts (see the module docstring).

    ``infinite_hit_rate`` is the best any cache can do on this order of prompts:
    ``1 - unique_tokens / total_tokens``. ``recommended_cache_tokens`` is None when no
    evaluated size reaches ``target`` of it (then the largest is the best available).
    """

    prompts: int
    total_tokens: int
    unique_tokens: int
    dedup_ratio: float
    infinite_hit_rate: float
    top_prefixes: tuple[SharedPrefix, ...]
    curve: tuple[CachePoint, ...]
    recommended_cache_tokens: int | None
    recommended_policy: str
    target: float
    block_size: int
    symbol_tokens: int
    policies: tuple[str, ...] = field(default=())

    def hit_rate(self, cache_tokens: int, policy: str) -> float:
        for point in self.curve:
            if point.cache_tokens == cache_tokens and point.policy == policy:
                return point.hit_rate
        raise KeyError((cache_tokens, policy))

    @property
    def cache_sizes(self) -> list[int]:
        return sorted({p.cache_tokens for p in self.curve})


class _CountNode:
    __slots__ = ("children", "count", "end", "key", "parent")

    def __init__(self, key: bytes, end: int, parent: _CountNode | None, count: int) -> None:
        self.key = key
        self.end = end
        self.parent = parent
        self.count = count
        self.children: dict[bytes, _CountNode] = {}


class PromptTrie:
    """A compressed radix trie over prompts (int64 bytes) counting the prompts through each
    node. :meth:`add` returns how many leading ids of the prompt were already in the trie."""

    def __init__(self) -> None:
        self.root = _CountNode(b"", 0, None, 0)
        self.nodes = 0

    def add(self, query: bytes) -> int:
        node = self.root
        node.count += 1
        pos = 0
        size = len(query)
        while pos < size:
            first = query[pos : pos + ID_BYTES]
            child = node.children.get(first)
            if child is None:
                node.children[first] = _CountNode(query[pos:], size // ID_BYTES, node, 1)
                self.nodes += 1
                return pos // ID_BYTES
            key = child.key
            if query.startswith(key, pos):
                child.count += 1
                pos += len(key)
                node = child
                continue
            shared = common_prefix(key, query, pos, size)
            upper = _CountNode(key[:shared], (pos + shared) // ID_BYTES, node, child.count + 1)
            node.children[first] = upper
            child.key = key[shared:]
            child.parent = upper
            upper.children[child.key[:ID_BYTES]] = child
            self.nodes += 1
            pos += shared
            if pos < size:
                upper.children[query[pos : pos + ID_BYTES]] = _CountNode(query[pos:], size // ID_BYTES, upper, 1)
                self.nodes += 1
            return pos // ID_BYTES
        return pos // ID_BYTES

    def footprint_blocks(self, block_tokens: int, symbol_tokens: int) -> int:
        """Blocks of ``block_tokens`` tokens a cache holding every prompt would use: each node
        covers its own token range, a block straddling a node boundary counted on both sides."""
        total = 0
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            start = (node.end - len(node.key) // ID_BYTES) * symbol_tokens
            total += -(-node.end * symbol_tokens // block_tokens) - start // block_tokens
            stack.extend(node.children.values())
        return total

    def shared_prefixes(self, top: int, symbol_tokens: int, preview: int = 12) -> list[SharedPrefix]:
        """The ``top`` prefixes shared by at least two prompts that save the most tokens."""
        candidates: list[tuple[int, int, _CountNode]] = []
        stack = list(self.root.children.values())
        order = 0
        while stack:
            node = stack.pop()
            if node.count >= 2:
                saved = (node.count - 1) * node.end * symbol_tokens
                order += 1
                item = (saved, -order, node)
                if len(candidates) < top:
                    heapq.heappush(candidates, item)
                elif item[:2] > candidates[0][:2]:
                    heapq.heapreplace(candidates, item)
                stack.extend(node.children.values())
        out = []
        for saved, _, node in sorted(candidates, key=lambda c: (-c[0], c[1])):
            keys = []
            current: _CountNode | None = node
            while current is not None:
                keys.append(current.key)
                current = current.parent
            path = ids_from_bytes(b"".join(reversed(keys)))
            out.append(SharedPrefix(node.end * symbol_tokens, node.count, saved, tuple(path[:preview].tolist())))
        return out


class _Replay:
    """One cache (size, policy) replayed: a pool of ``blocks`` blocks and a real index."""

    def __init__(self, cache_tokens: int, blocks: int, block_size: int, policy: str) -> None:
        self.cache_tokens = cache_tokens
        self.blocks = blocks
        self.policy = policy
        self.block_size = block_size
        self.pool = BlockPool(blocks) if blocks else None
        self.index = PrefixIndex(self.pool, block_size, policy=make_policy(policy)) if self.pool else None
        self.hit_tokens = 0

    def feed(self, prompt: Int64Array, raw: bytes, num_tokens: int, symbol_tokens: int,
             generated_tokens: int | None = None) -> None:
        """Replay one prompt (``raw``: its ids as int64 bytes, shared by every replay), whose
        request generated ``generated_tokens`` (None: not known)."""
        index, pool = self.index, self.pool
        if index is None or pool is None:
            return
        match = index.lookup(prompt)
        matched = match.matched_tokens
        self.hit_tokens += min(matched * symbol_tokens, num_tokens)
        size = prompt.size
        if matched == size:
            return
        bs = self.block_size
        full = matched // bs
        needed = -(-size // bs) - full  # includes the copy of a shared partial block
        lease = None
        if needed > pool.num_free:
            if matched:
                lease = index.acquire(match)  # the reused prefix must survive the evictions
            index.evict(needed - pool.num_free)
        try:
            take = min(needed, pool.num_free)
            keep = min(size, (full + take) * bs)  # what fits when the cache is too small
            if take == 0 or keep <= matched:
                return
            fresh = pool.allocate(take)
            assert fresh is not None
            table = np.concatenate([match.block_ids[:full], fresh]) if full else fresh
            # The prompt was validated when the workload was read, the table is ours.
            index.insert_trusted(raw if keep == size else raw[: keep * ID_BYTES], table,
                                 generated_tokens=generated_tokens)
            pool.decref_distinct(fresh)  # the "sequence" ends: the index holds the blocks now
        finally:
            if lease is not None:
                index.release(lease)

    def point(self, total_tokens: int) -> CachePoint:
        evicted = self.index.stats().total_evicted_blocks if self.index is not None else 0
        return CachePoint(
            self.cache_tokens,
            self.blocks,
            self.policy,
            self.hit_tokens,
            self.hit_tokens / total_tokens if total_tokens else 0.0,
            evicted,
        )


def analyze_workload(
    prompts: Workload | Iterable[Sequence[int] | Int64Array],
    *,
    block_size: int = 16,
    cache_sizes: Sequence[int] | None = None,
    policies: Sequence[str] = ("lru", "lfu", "reuse"),
    top: int = 10,
    target: float = 0.9,
    progress: Progress | None = None,
) -> WorkloadAnalysis:
    """Analyse ``prompts`` (a :class:`Workload` or token-id sequences); see the module docstring.

    ``cache_sizes`` are in tokens (default: fractions of the unique tokens, up to all of
    them); the replay's block is ``block_size`` tokens, or one block id of a block trace
    analysed at block granularity. ``policies``: any of ``lru``, ``lfu`` and ``reuse`` (a TTL
    needs arrival times the replay does not model); ``reuse`` learns from the generated
    lengths the workload gives, if any. Raises :class:`InvalidArgument` for bad parameters.
    """
    workload = prompts if isinstance(prompts, Workload) else Workload.from_prompts(list(prompts))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise InvalidArgument(f"block_size must be a positive integer, got {block_size!r}")
    if not 0 < target <= 1:
        raise InvalidArgument(f"target must be in (0, 1], got {target!r}")
    names = []
    for policy in policies:
        parts = parse_policy_name(policy)
        if "ttl" in parts:
            raise InvalidArgument(f"policy {policy!r}: a TTL needs arrival times; analyse with lru, lfu or reuse")
        names.append("+".join(parts))
    if not names:
        raise InvalidArgument("name at least one policy (lru, lfu, reuse)")
    if cache_sizes is not None:
        bad = [s for s in cache_sizes if isinstance(s, bool) or not isinstance(s, int) or s <= 0]
        if bad or not cache_sizes:
            raise InvalidArgument(f"cache sizes must be positive token counts, got {list(cache_sizes)!r}")
    symbol_tokens = workload.symbol_tokens
    replay_block = 1 if symbol_tokens > 1 else block_size
    block_tokens = replay_block * symbol_tokens
    total = workload.total_tokens

    def replays_for(sizes: Sequence[int]) -> list[_Replay]:
        return [
            _Replay(size, size // block_tokens, replay_block, policy)
            for size in sorted(set(sizes))
            for policy in names
        ]

    def default_sizes(footprint_blocks: int) -> list[int]:
        return sorted({max(1, round(footprint_blocks * f)) * block_tokens for f in DEFAULT_SIZE_FRACTIONS})

    replays: list[_Replay] = []
    two_passes = False
    if cache_sizes is not None:
        replays = replays_for(cache_sizes)
    elif workload.expand:
        # The block ids tell the cache's footprint without expanding anything: one pass.
        hint = PromptTrie()
        for ids in workload.records:
            hint.add(ids.tobytes())
        replays = replays_for(default_sizes(hint.footprint_blocks(block_tokens, workload.block_tokens)))
    else:
        two_passes = True
    work = total * (2 if two_passes else 1)
    done = 0
    trie = PromptTrie()
    unique = 0
    generated = workload.generated()
    for array, num_tokens, output in zip(workload, workload.num_tokens, generated):
        raw = array.tobytes()
        matched = trie.add(raw)
        unique += num_tokens - min(matched * symbol_tokens, num_tokens)
        for replay in replays:
            replay.feed(array, raw, num_tokens, symbol_tokens, output)
        done += num_tokens
        if progress is not None:
            progress(done, work)
    if two_passes:
        replays = replays_for(default_sizes(trie.footprint_blocks(block_tokens, symbol_tokens)))
        for array, num_tokens, output in zip(workload, workload.num_tokens, generated):
            raw = array.tobytes()
            for replay in replays:
                replay.feed(array, raw, num_tokens, symbol_tokens, output)
            done += num_tokens
            if progress is not None:
                progress(done, work)

    curve = tuple(r.point(total) for r in replays)
    infinite = 1 - unique / total if total else 0.0
    recommended, policy = _recommend(curve, infinite, target, names)
    return WorkloadAnalysis(
        prompts=len(workload),
        total_tokens=total,
        unique_tokens=unique,
        dedup_ratio=total / unique if unique else float("inf"),
        infinite_hit_rate=infinite,
        top_prefixes=tuple(trie.shared_prefixes(top, symbol_tokens)),
        curve=curve,
        recommended_cache_tokens=recommended,
        recommended_policy=policy,
        target=target,
        block_size=block_tokens,
        symbol_tokens=symbol_tokens,
        policies=tuple(names),
    )


def _recommend(curve: Sequence[CachePoint], infinite: float, target: float, policies: list[str]) -> tuple[int | None, str]:
    """The smallest size whose best policy reaches ``target * infinite`` and that policy
    (ties go to the policy listed first); (None, best policy at the largest size) if none."""
    best: dict[int, CachePoint] = {}
    for point in curve:
        current = best.get(point.cache_tokens)
        if current is None or point.hit_tokens > current.hit_tokens or (
            point.hit_tokens == current.hit_tokens and policies.index(point.policy) < policies.index(current.policy)
        ):
            best[point.cache_tokens] = point
    if not best:
        return None, policies[0]
    goal = target * infinite
    for size in sorted(best):
        if best[size].hit_rate >= goal - 1e-12:
            return size, best[size].policy
    return None, best[max(best)].policy
