"""Stateful property test of the prefix index on a real paged KV engine, against a reference.

Random prompts over a 4-token alphabet (so prefixes collide and edges split all the time) are
started as engine sequences on top of their cached prefix (token-granular: shared partial
blocks are copied on write), inserted, extended, forked, freed, looked up, leased, pinned,
removed, demoted and evicted (capacity, TTL, reclaimer) in two namespaces. The reference is the set of
prompts inserted per namespace. After every step:

- every match is a prefix of some inserted prompt of its namespace (never of another
  namespace's), and at least as long as its common prefix with any prompt inserted since the
  last eviction or pinned;
- the K/V read through the match's blocks is bit-exact (K/V depend on the whole prefix, so a
  wrong or reused block shows up);
- no block in use is evicted: every live sequence and every lease still reads its K/V;
- the tree, the ref counts (engine + index + leases) and the pool agree.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvcluster.core.eviction import make_policy
from kvcluster.core.kv_engine import PagedKVEngine, SequenceId
from kvcluster.core.prefix_index import PrefixIndex
from kvcluster.core.prefix_records import Lease
from kvcluster.errors import CapacityError, ContextTooLong, PinBudgetExceeded
from kvcluster.model_spec import ModelSpec
from tests.kvcluster.prefix_cache_helpers import FakeClock, causal_kv

SPEC = ModelSpec(
    name="prefix-stateful", num_layers=1, num_attention_heads=1, num_kv_heads=1, head_dim=2,
    hidden_size=4, intermediate_size=4, vocab_size=8, dtype="float32",
)
BLOCK = 4
BLOCKS = 40
MAX_CONTEXT = 40
NAMESPACES = ("a", "b")

# Shared starts of different lengths (some ending inside a block) so that edges split at and
# inside block boundaries and long matches are common.
BASES = ([], [0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1, 2, 3, 3], [1, 1, 1, 1, 1], [0, 1, 2, 2])
prompts = st.builds(
    lambda base, tail: (base + tail) or [0],
    st.sampled_from(BASES),
    st.lists(st.integers(0, 3), max_size=8),
)
namespaces = st.sampled_from(NAMESPACES)


def kv_of(tokens: list[int]) -> torch.Tensor:
    return causal_kv(tokens)


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCacheMachine(RuleBasedStateMachine):
    @initialize(policy=st.sampled_from(["lru", "lfu", "reuse", "lru+ttl", "lfu+ttl", "reuse+ttl"]),
                native=st.booleans())
    def build(self, policy: str, native: bool) -> None:
        self.clock = FakeClock()
        self.engine = PagedKVEngine(SPEC, block_size=BLOCK, num_blocks=BLOCKS, max_context=MAX_CONTEXT)
        ttl = 5.0 if "ttl" in policy else None
        self.index = PrefixIndex(
            self.engine.pool, BLOCK, policy=make_policy(policy, ttl_s=ttl, clock=self.clock),
            clock=self.clock, pin_budget_fraction=0.3, native=native,
        )
        self.engine.set_reclaimer(self.index.evict)
        self.engine.set_reclaimable(self.index.reclaimable_blocks)
        self.live: dict[SequenceId, tuple[str, list[int]]] = {}
        self.inserted: dict[str, set[tuple[int, ...]]] = {ns: set() for ns in NAMESPACES}
        self.guaranteed: dict[str, set[tuple[int, ...]]] = {ns: set() for ns in NAMESPACES}
        self.pinned: dict[tuple[str, tuple[int, ...]], int] = {}
        self.leases: list[tuple[Lease, list[int]]] = []
        self.leased_prefixes: dict[int, tuple[str, list[int]]] = {}  # lease id -> must stay cached
        self.evictions_seen = 0

    # --- helpers -----------------------------------------------------------------------------

    def _sync_evictions(self) -> None:
        stats = self.index.stats()  # a partial eviction frees blocks and drops no node
        total = sum(stats.evicted_nodes.values()) + sum(stats.evictions.values())
        if total != self.evictions_seen:
            self.evictions_seen = total
            for ns in NAMESPACES:
                self.guaranteed[ns].clear()

    def _insert(self, seq: SequenceId) -> None:
        ns, tokens = self.live[seq]
        # Generated lengths vary so the reuse policy ranks stores differently.
        self.index.insert(self.engine.tokens(seq), self.engine.block_table(seq), ns,
                          generated_tokens=len(tokens) * 37 % 1000)
        self._sync_evictions()
        self.inserted[ns].add(tuple(tokens))
        self.guaranteed[ns].add(tuple(tokens))

    def _check_match(self, ns: str, prompt: list[int]) -> int:
        match = self.index.lookup(prompt, ns)
        self._sync_evictions()
        matched = match.matched_tokens
        upper = max((common_prefix(p, prompt) for p in self.inserted[ns]), default=0)
        lower = max((common_prefix(p, prompt) for p in self.guaranteed[ns]), default=0)
        pinned = max((min(n, common_prefix(p, prompt)) for (pns, p), n in self.pinned.items() if pns == ns), default=0)
        assert max(lower, pinned) <= matched <= upper, (ns, prompt, matched, lower, pinned, upper)
        assert match.remaining.tolist() == prompt[matched:]
        if matched:
            got = self.engine.pages.read_tokens(match.block_ids, 0, matched)
            assert torch.equal(got, kv_of(prompt[:matched])), "cached K/V differ from the prompt's"
        return matched

    # --- rules -------------------------------------------------------------------------------

    @rule(ns=namespaces, prompt=prompts, insert=st.booleans(), keep=st.booleans())
    def start(self, ns: str, prompt: list[int], insert: bool, keep: bool) -> None:
        matched = self._check_match(ns, prompt)
        match = self.index.lookup(prompt, ns)
        assert match.matched_tokens == matched
        try:
            seq = self.engine.create_sequence(
                prompt, kv_of(prompt)[:, :, matched:], shared_blocks=match.block_ids, shared_tokens=matched
            )
        except CapacityError:
            self._sync_evictions()
            return
        self._sync_evictions()
        self.live[seq] = (ns, list(prompt))
        if insert:
            self._insert(seq)
        if not keep:
            self.engine.free(seq)
            del self.live[seq]

    @precondition(lambda self: self.live)
    @rule(data=st.data(), more=prompts, insert=st.booleans())
    def extend(self, data: st.DataObject, more: list[int], insert: bool) -> None:
        seq = data.draw(st.sampled_from(sorted(self.live)))
        ns, tokens = self.live[seq]
        full = tokens + more
        try:
            self.engine.append(seq, more, kv_of(full)[:, :, len(tokens):])
        except (CapacityError, ContextTooLong):
            self._sync_evictions()
            return
        self._sync_evictions()
        self.live[seq] = (ns, full)
        if insert:
            self._insert(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.live)))
        child = self.engine.fork(seq)
        self.live[child] = (self.live[seq][0], list(self.live[seq][1]))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.live)))
        self.engine.free(seq)
        del self.live[seq]

    @rule(ns=namespaces, prompt=prompts)
    def lookup(self, ns: str, prompt: list[int]) -> None:
        self._check_match(ns, prompt)

    @rule(ns=namespaces, prompt=prompts)
    def lease(self, ns: str, prompt: list[int]) -> None:
        match = self.index.lookup(prompt, ns)
        lease = self.index.acquire(match)
        self.leases.append((lease, prompt[: match.matched_tokens]))
        self.leased_prefixes[lease.lease_id] = (ns, prompt[: match.matched_tokens])

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lease, _ = self.leases.pop(data.draw(st.integers(0, len(self.leases) - 1)))
        self.index.release(lease)
        self.leased_prefixes.pop(lease.lease_id, None)

    @rule(n=st.integers(0, 12))
    def evict(self, n: int) -> None:
        self.index.evict(n)
        self._sync_evictions()

    @rule(seconds=st.sampled_from([1.0, 3.0, 6.0]))
    def expire(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.index.evict_expired()
        self._sync_evictions()

    @rule(ns=namespaces, prompt=prompts, priority=st.integers(0, 2))
    def pin(self, ns: str, prompt: list[int], priority: int) -> None:
        try:
            pinned = self.index.pin(prompt, ns, priority)
        except PinBudgetExceeded:
            return
        # A pin may displace lower-priority ones.
        self.pinned = {key: n for key, n in self.pinned.items() if self.index.is_pinned(list(key[1]), key[0])}
        if pinned:
            self.pinned[(ns, tuple(prompt))] = pinned

    @precondition(lambda self: self.pinned)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.pinned)))
        assert self.index.unpin(list(key[1]), key[0])
        del self.pinned[key]

    @precondition(lambda self: any(self.inserted.values()))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        ns = data.draw(st.sampled_from([n for n in NAMESPACES if self.inserted[n]]))
        prompt = data.draw(st.sampled_from(sorted(self.inserted[ns])))
        self.index.remove(list(prompt), ns)
        # Only nodes no other inserted sequence ends in or passes through are pruned; an
        # explicit removal may drop leased nodes (their blocks stay with the lease).
        self.guaranteed[ns].discard(prompt)
        self.leased_prefixes = {k: v for k, v in self.leased_prefixes.items() if v[0] != ns}

    @precondition(lambda self: any(self.inserted.values()))
    @rule(data=st.data(), keep=st.integers(0, 10))
    def demote(self, data: st.DataObject, keep: int) -> None:
        # A conversation ended: its nodes go to the front of the order; nothing is freed.
        ns = data.draw(st.sampled_from([n for n in NAMESPACES if self.inserted[n]]))
        prompt = data.draw(st.sampled_from(sorted(self.inserted[ns])))
        free = self.engine.pool.num_free
        self.index.demote(list(prompt), ns, keep_tokens=keep)
        assert self.engine.pool.num_free == free, "demote freed blocks"

    # --- invariants --------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "index"):
            return
        self.index.check_invariants()
        self.engine.check_invariants(external_refs=self.index.held_refs())

    @invariant()
    def nothing_in_use_was_evicted(self) -> None:
        if not hasattr(self, "index"):
            return
        for seq, (_, tokens) in self.live.items():
            assert torch.equal(self.engine.read_kv(seq), kv_of(tokens)), f"sequence {seq} lost its K/V"
        for lease, tokens in self.leases:
            if tokens:
                got = self.engine.pages.read_tokens(lease.block_ids, 0, len(tokens))
                assert torch.equal(got, kv_of(tokens)), "a leased block changed"
        for ns, tokens in self.leased_prefixes.values():
            if tokens:
                assert self.index.peek(tokens, ns) >= len(tokens), "a leased prefix was evicted"

    def teardown(self) -> None:
        if not hasattr(self, "index"):
            return
        for lease, _ in self.leases:
            self.index.release(lease)
        for seq in list(self.live):
            self.engine.free(seq)
        for ns in NAMESPACES:
            self.index.clear_namespace(ns)
        assert self.engine.pool.num_free == BLOCKS, "a block leaked"


TestPrefixCacheMachine = PrefixCacheMachine.TestCase
TestPrefixCacheMachine.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
