"""Stateful property test of the paged KV engine against a plain reference model.

Random create / create-from-shared-prefix / append / fork / free / external adopt + release
runs against a dict ``seq -> (tokens, K/V)``. After every step: ref counts equal the
references held by sequences plus the external holder (no leaked or doubly-owned block), and
every stored token's K/V reads back bit-exact. Freeing everything returns every block.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from kvcluster.core.kv_engine import PagedKVEngine, SequenceId
from kvcluster.errors import CapacityError, ContextTooLong
from kvcluster.model_spec import ModelSpec

SPEC = ModelSpec(
    name="stateful", num_layers=2, num_attention_heads=2, num_kv_heads=1, head_dim=3,
    hidden_size=8, intermediate_size=8, vocab_size=50, dtype="float32",
)
BLOCK = 4
BLOCKS = 24
MAX_CONTEXT = 48


class EngineMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    def __init__(self) -> None:
        super().__init__()
        self.engine = PagedKVEngine(
            SPEC, block_size=BLOCK, num_blocks=BLOCKS, max_context=MAX_CONTEXT
        )
        self.model: dict[SequenceId, tuple[list[int], torch.Tensor]] = {}
        self.external: Counter[int] = Counter()  # a stand-in prefix cache's references
        self.counter = 0

    def _kv(self, n: int) -> torch.Tensor:
        # Distinct values per write so that a misplaced row can never match by chance.
        self.counter += 1
        base = torch.arange(n * 2 * 3, dtype=torch.float32).reshape(1, 1, n, 1, 3 * 2)
        values = base[..., :3].expand(2, 2, n, 1, 3).clone() + self.counter * 1000.0
        values[1] += 0.5
        values[:, 1] += 0.25
        return values

    def _snapshot(self) -> tuple[int, np.ndarray, dict[int, list[int]]]:
        e = self.engine
        return (
            e.pool.num_free,
            e.pool.ref_counts_view().copy(),
            {s: e.block_table(s).tolist() for s in e.sequence_ids()},
        )

    def _assert_unchanged(self, before: tuple[int, np.ndarray, dict[int, list[int]]]) -> None:
        after = self._snapshot()
        assert after[0] == before[0]
        assert np.array_equal(after[1], before[1])
        assert after[2] == before[2]

    @initialize()
    def start(self) -> None:
        assert self.engine.pool.num_free == BLOCKS

    @rule(target=seqs, tokens=st.lists(st.integers(0, 49), max_size=30))
    def create(self, tokens: list[int]) -> SequenceId:
        kv = self._kv(len(tokens))
        fits = self.engine.can_allocate(len(tokens))
        before = self._snapshot()
        try:
            seq = self.engine.create_sequence(tokens, kv)
        except CapacityError:
            assert not fits
            self._assert_unchanged(before)
            return SequenceId(-1)
        assert fits
        self.model[seq] = (list(tokens), kv)
        return seq

    @rule(target=seqs, donor=seqs, data=st.data())
    def create_from_shared_prefix(self, donor: SequenceId, data: st.DataObject) -> SequenceId:
        if donor not in self.model:
            return SequenceId(-1)
        donor_tokens, donor_kv = self.model[donor]
        shared = data.draw(st.integers(0, len(donor_tokens)), label="shared_tokens")
        extra = data.draw(st.lists(st.integers(0, 49), max_size=12), label="extra")
        table = self.engine.block_table(donor)[: -(-shared // BLOCK)]
        kv = self._kv(len(extra))
        tokens = donor_tokens[:shared] + extra
        before = self._snapshot()
        try:
            seq = self.engine.create_sequence(
                tokens, kv, shared_blocks=table, shared_tokens=shared
            )
        except CapacityError:
            self._assert_unchanged(before)
            return SequenceId(-1)
        self.model[seq] = (tokens, torch.cat([donor_kv[:, :, :shared], kv], dim=2))
        return seq

    @rule(seq=seqs, tokens=st.lists(st.integers(0, 49), max_size=20))
    def append(self, seq: SequenceId, tokens: list[int]) -> None:
        if seq not in self.model:
            return
        kv = self._kv(len(tokens))
        old_tokens, old_kv = self.model[seq]
        fits = self.engine.can_allocate(len(tokens), seq)
        before = self._snapshot()
        try:
            self.engine.append(seq, tokens, kv)
        except (CapacityError, ContextTooLong):
            assert not fits
            self._assert_unchanged(before)
            return
        assert fits
        self.model[seq] = (old_tokens + tokens, torch.cat([old_kv, kv], dim=2))

    @rule(target=seqs, seq=seqs)
    def fork(self, seq: SequenceId) -> SequenceId:
        if seq not in self.model:
            return SequenceId(-1)
        free = self.engine.pool.num_free
        child = self.engine.fork(seq)
        assert self.engine.pool.num_free == free
        tokens, kv = self.model[seq]
        self.model[child] = (list(tokens), kv)
        return child

    @rule(seq=consumes(seqs))
    def free(self, seq: SequenceId) -> None:
        if seq not in self.model:
            return
        self.engine.free(seq)
        del self.model[seq]

    @rule(seq=seqs, data=st.data())
    def adopt_block(self, seq: SequenceId, data: st.DataObject) -> None:
        """An outside holder (the prefix cache) takes a reference on one block."""
        if seq not in self.model or self.engine.num_tokens(seq) == 0:
            return
        table = self.engine.block_table(seq)
        block = int(table[data.draw(st.integers(0, table.size - 1), label="block")])
        self.engine.pool.incref([block])
        self.external[block] += 1

    @precondition(lambda self: bool(self.external))
    @rule(data=st.data())
    def release_block(self, data: st.DataObject) -> None:
        block = data.draw(st.sampled_from(sorted(self.external)), label="release")
        self.engine.pool.decref([block])
        self.external[block] -= 1
        if not self.external[block]:
            del self.external[block]

    @invariant()
    def ref_counts_match_holders(self) -> None:
        self.engine.check_invariants(dict(self.external))
        assert self.engine.num_sequences() == len(self.model)

    @invariant()
    def every_token_reads_back_bit_exact(self) -> None:
        for seq, (tokens, kv) in self.model.items():
            assert self.engine.tokens(seq).tolist() == tokens
            stored = self.engine.read_kv(seq)
            assert torch.equal(stored.view(torch.int32), kv.view(torch.int32)), f"K/V of {seq}"

    def teardown(self) -> None:
        for seq in list(self.model):
            self.engine.free(seq)
        for block, count in self.external.items():
            self.engine.pool.decref([block] * count)
        assert self.engine.pool.num_free == BLOCKS, "blocks leaked"
        self.engine.check_invariants()


EngineMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEngineStateful = EngineMachine.TestCase
