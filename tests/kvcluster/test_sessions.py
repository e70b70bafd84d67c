"""Multi-turn sessions on the paged engine + prefix index: turns hit their history, first turns
reuse shared system prompts token-granularly, forks share by copy-on-write, idle TTL."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcluster.core.eviction import make_policy
from kvcluster.core.kv_engine import PagedKVEngine
from kvcluster.core.prefix_index import PrefixIndex
from kvcluster.core.sessions import SessionManager
from kvcluster.errors import (
    CapacityError,
    InvalidArgument,
    InvalidKV,
    InvalidTokens,
    UnknownSession,
)
from kvcluster.model_spec import ModelSpec
from tests.kvcluster.prefix_cache_helpers import FakeClock, causal_kv

SPEC = ModelSpec(
    name="sessions", num_layers=1, num_attention_heads=1, num_kv_heads=1, head_dim=2,
    hidden_size=4, intermediate_size=4, vocab_size=1000, dtype="float32",
)
BLOCK = 4
SYSTEM = list(range(100, 110))  # 10 tokens: ends inside the third block


class Node:
    def __init__(self, num_blocks: int = 64, idle_ttl_s: float = 60.0) -> None:
        self.clock = FakeClock()
        self.engine = PagedKVEngine(SPEC, block_size=BLOCK, num_blocks=num_blocks, max_context=256)
        self.index = PrefixIndex(self.engine.pool, BLOCK, policy=make_policy("lru", clock=self.clock), clock=self.clock)
        self.engine.set_reclaimer(self.index.evict)
        self.engine.set_reclaimable(self.index.reclaimable_blocks)
        self.sessions = SessionManager(self.engine, self.index, idle_ttl_s=idle_ttl_s, clock=self.clock)

    def check(self) -> None:
        self.index.check_invariants()
        self.engine.check_invariants(external_refs=self.index.held_refs())


def turn(history: list[int], new: list[int]) -> tuple[list[int], torch.Tensor]:
    """The new tokens and their K/V given the history before them."""
    full = history + new
    return new, causal_kv(full)[:, :, len(history):]


@pytest.fixture
def node() -> Node:
    return Node()


def test_each_turn_hits_everything_before_it(node: Node) -> None:
    chat = node.sessions.open("c1")
    history: list[int] = []
    for new in ([*SYSTEM, 1, 2, 3], [4, 5, 6, 7, 8], [9, 10]):
        tokens, kv = turn(history, new)
        result = chat.extend(tokens, kv)
        history += new
        assert result.total_tokens == len(history)
        assert torch.equal(chat.read_kv(), causal_kv(history))
        following = [*history, 500, 501]
        match = node.index.lookup(following)
        assert match.matched_tokens == len(history)
        got = node.engine.pages.read_tokens(match.block_ids, 0, match.matched_tokens)
        assert torch.equal(got, causal_kv(history))
    assert chat.turns == 3 and chat.num_tokens == len(history)
    assert chat.tokens().tolist() == history
    node.check()


def test_first_turn_shares_a_cached_system_prompt_token_granularly(node: Node) -> None:
    a = node.sessions.open("a")
    a.extend(*turn([], [*SYSTEM, 1, 1, 1]))
    b = node.sessions.open("b")
    result = b.extend(*turn([], [*SYSTEM, 2, 2]))
    assert result.reused_tokens == len(SYSTEM)  # 10 tokens: 2 full blocks + 2 rows of the third
    table_a = node.engine.block_table(a.sequence_id)
    table_b = node.engine.block_table(b.sequence_id)
    assert table_b[:2].tolist() == table_a[:2].tolist()  # full blocks shared
    assert table_b[2] != table_a[2]  # the partial block was copied before B wrote into it
    assert torch.equal(b.read_kv(), causal_kv([*SYSTEM, 2, 2]))
    assert torch.equal(a.read_kv(), causal_kv([*SYSTEM, 1, 1, 1]))
    node.check()


def test_fork_shares_history_by_copy_on_write(node: Node) -> None:
    parent = node.sessions.open("parent")
    history = [*SYSTEM, 7, 7]
    parent.extend(*turn([], history))
    child = parent.fork("child")
    assert child.namespace == "default" and child.num_tokens == len(history)
    assert node.engine.block_table(child.sequence_id).tolist() == node.engine.block_table(parent.sequence_id).tolist()
    parent.extend(*turn(history, [1, 2, 3]))
    child.extend(*turn(history, [4, 5]))
    assert torch.equal(parent.read_kv(), causal_kv([*history, 1, 2, 3]))
    assert torch.equal(child.read_kv(), causal_kv([*history, 4, 5]))
    assert node.index.lookup([*history, 1, 2, 3]).matched_tokens == len(history) + 3
    assert node.index.lookup([*history, 4, 5]).matched_tokens == len(history) + 2
    node.check()


def test_idle_sessions_expire_and_their_blocks_stay_cached(node: Node) -> None:
    idle = node.sessions.open("idle")
    busy = node.sessions.open("busy")
    idle.extend(*turn([], [1, 2, 3, 4, 5]))
    busy.extend(*turn([], [6, 7, 8]))
    assert node.index.reclaimable_blocks() == 0  # both sequences hold their blocks
    node.clock.advance(40)
    busy.extend(*turn([6, 7, 8], [9]))
    node.clock.advance(20)
    assert node.sessions.expire_idle() == ["idle"]
    assert not idle.is_open and busy.is_open
    with pytest.raises(UnknownSession):
        idle.extend(*turn([], [1]))
    assert node.index.lookup([1, 2, 3, 4, 5]).matched_tokens == 5
    # Idle's two blocks, plus the tree's copy of busy's old partial block [6, 7, 8] (busy wrote
    # its next turn into a copy): an upper bound, that node sits above busy's leaf.
    assert node.index.reclaimable_blocks() == 3
    # Reopened, the conversation starts from its cached history.
    again = node.sessions.open("idle")
    result = again.extend(*turn([], [1, 2, 3, 4, 5, 6]))
    assert result.reused_tokens == 5
    assert torch.equal(again.read_kv(), causal_kv([1, 2, 3, 4, 5, 6]))
    assert node.sessions.close("idle") and not node.sessions.close("idle")
    node.check()


def test_namespaces_do_not_share_history(node: Node) -> None:
    node.sessions.open("x", namespace="tenant-x").extend(*turn([], SYSTEM))
    other = node.sessions.open("y", namespace="tenant-y")
    assert other.extend(*turn([], SYSTEM)).reused_tokens == 0
    with pytest.raises(InvalidArgument, match="namespace"):
        node.sessions.open("y", namespace="tenant-x")


def test_bad_turns_change_nothing(node: Node) -> None:
    chat = node.sessions.open("c")
    chat.extend(*turn([], [1, 2, 3]))
    stats, tokens = node.index.stats(), chat.tokens().tolist()
    with pytest.raises(InvalidKV):
        chat.extend([4, 5], causal_kv([1, 2, 3, 4]))  # K/V for the wrong number of tokens
    with pytest.raises(InvalidTokens):
        chat.extend([], causal_kv([]))
    with pytest.raises(InvalidTokens):
        chat.extend([4, 2000], causal_kv([4, 5]))  # outside the model's vocabulary
    assert chat.tokens().tolist() == tokens and node.index.stats() == stats
    with pytest.raises(UnknownSession):
        node.sessions.get("nobody")
    with pytest.raises(InvalidArgument):
        node.sessions.open("")
    with pytest.raises(InvalidArgument, match="already open"):
        chat.fork("c")
    node.check()


def test_a_turn_that_does_not_fit_changes_nothing() -> None:
    node = Node(num_blocks=4)
    chat = node.sessions.open("c")
    chat.extend(*turn([], list(range(8))))
    before = (chat.tokens().tolist(), node.engine.pool.num_free)
    with pytest.raises(CapacityError):
        chat.extend(*turn(list(range(8)), list(range(8, 20))))
    assert (chat.tokens().tolist(), node.engine.pool.num_free) == before
    assert torch.equal(chat.read_kv(), causal_kv(list(range(8))))
    node.check()


def test_manager_rejects_a_mismatched_index_or_ttl() -> None:
    node = Node()
    other = PagedKVEngine(SPEC, block_size=BLOCK, num_blocks=8)
    with pytest.raises(InvalidArgument, match="pool"):
        SessionManager(other, node.index)
    with pytest.raises(InvalidArgument, match="idle_ttl_s"):
        SessionManager(node.engine, node.index, idle_ttl_s=0)
    empty = node.sessions.open("empty")
    assert empty.num_tokens == 0 and empty.tokens().size == 0 and empty.read_kv().shape[2] == 0
    assert np.array_equal(empty.fork("empty-2").tokens(), np.empty(0, dtype=np.int64))


# --- ending a conversation ------------------------------------------------------------------

OWN_A, OWN_B = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]  # after SYSTEM: 16 tokens, 4 blocks each


def open_two_after_the_system_prompt(node: Node) -> None:
    warmup = node.sessions.open("warmup")
    warmup.extend(SYSTEM, causal_kv(SYSTEM))
    warmup.close()
    for name, own in (("b", OWN_B), ("a", OWN_A)):  # a is the more recent
        node.sessions.open(name).extend(SYSTEM + own, causal_kv(SYSTEM + own))
    node.sessions.close("b")


def test_closing_an_ended_conversation_demotes_what_only_it_cached(node: Node) -> None:
    open_two_after_the_system_prompt(node)
    assert node.sessions.close("a", ended=True)
    node.index.evict(2)  # a's own node [10, 16): its copy of the straddling third block, the fourth
    assert node.index.peek(SYSTEM + OWN_A) == len(SYSTEM)
    assert node.index.peek(SYSTEM + OWN_B) == 16
    assert node.index.peek(SYSTEM) == len(SYSTEM)
    assert not node.sessions.close("a", ended=True)  # closing twice is harmless
    node.check()


def test_a_plain_close_keeps_the_ended_conversations_blocks_in_their_place(node: Node) -> None:
    open_two_after_the_system_prompt(node)
    node.sessions.close("a")  # a reopening is expected: no demotion
    node.index.evict(2)
    assert node.index.peek(SYSTEM + OWN_A) == 16
    assert node.index.peek(SYSTEM + OWN_B) == len(SYSTEM)


def test_an_ended_fork_demotes_only_what_it_added(node: Node) -> None:
    parent = node.sessions.open("parent")
    parent.extend(SYSTEM + OWN_A, causal_kv(SYSTEM + OWN_A))
    child = parent.fork("child")
    extra, kv = turn(SYSTEM + OWN_A, [60, 61, 62, 63])
    child.extend(extra, kv)
    other = node.sessions.open("other")
    other.extend(SYSTEM + OWN_B, causal_kv(SYSTEM + OWN_B))
    for name in ("parent", "other"):
        node.sessions.close(name)
    child.close(ended=True)
    node.index.evict(1)
    assert node.index.peek(SYSTEM + OWN_A + extra) == 16  # the fork's own block went first
    assert node.index.peek(SYSTEM + OWN_B) == 16
    node.check()


def test_an_ended_conversation_still_serves_until_evicted(node: Node) -> None:
    chat = node.sessions.open("c")
    chat.extend(SYSTEM + OWN_A, causal_kv(SYSTEM + OWN_A))
    chat.close(ended=True)
    again = node.sessions.open("again")
    new, kv = turn([], SYSTEM + OWN_A + [99])
    assert again.extend(new, kv).reused_tokens == 16
    assert torch.equal(again.read_kv(), causal_kv(SYSTEM + OWN_A + [99]))
    node.check()
