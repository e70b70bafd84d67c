"""Kept prompts: a long prompt crosses the wire once, later ones refer to it."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvcluster.errors import InvalidArgument, InvalidTokens, UnknownPrompt
from kvcluster.prompt_memory import (
    PER_FAMILY,
    PROMPT_ID_BYTES,
    REFUSAL_PAUSE_S,
    REFUSALS_BEFORE_PAUSE,
    PromptMemory,
    SentPrompts,
)
from kvcluster.token_wire import frame_to_wire, prompt_from_wire, prompt_ids, wire_dtype

DTYPE = wire_dtype(32_000)


def ids_of(tokens: np.ndarray) -> bytes:
    return prompt_ids(tokens.astype(np.int64), DTYPE)


def new_id() -> bytes:
    return os.urandom(PROMPT_ID_BYTES)


def test_a_kept_prompt_is_extended_by_reference_and_decodes_exactly() -> None:
    memory = PromptMemory(100_000)
    first = np.random.default_rng(0).integers(0, 32_000, 5_000)
    first_id = new_id()
    _, decoded = prompt_from_wire(frame_to_wire("t", DTYPE, ids_of(first), remember_as=first_id), memory)
    np.testing.assert_array_equal(decoded, first)
    assert len(memory) == 1 and memory.tokens == 5_000

    second = np.concatenate([first, [1, 2, 3]])
    wire = frame_to_wire("t", DTYPE, ids_of(second), remember_as=new_id(), base=(first_id, first.size))
    assert sum(map(len, wire)) == 4 + 1 + 2 * PROMPT_ID_BYTES + 4 + 3 * 2  # the new ids only
    namespace, decoded = prompt_from_wire(wire, memory)
    assert namespace == "t" and decoded.dtype == np.int64 and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, second)
    assert len(memory) == 2 and memory.tokens == 10_003

    # A base may cover part of a kept prompt.
    part = np.concatenate([first[:100], [9]])
    _, decoded = prompt_from_wire(frame_to_wire("t", DTYPE, ids_of(part), base=(first_id, 100)), memory)
    np.testing.assert_array_equal(decoded, part)


def test_an_unknown_base_is_refused_before_anything_is_kept() -> None:
    memory = PromptMemory(100_000)
    wire = frame_to_wire("t", DTYPE, ids_of(np.arange(10)), remember_as=new_id(), base=(new_id(), 5))
    with pytest.raises(UnknownPrompt, match="send it in full"):
        prompt_from_wire(wire, memory)
    assert len(memory) == 0


def test_a_base_of_another_namespace_or_longer_than_kept_is_refused() -> None:
    memory = PromptMemory(100_000)
    kept_id = new_id()
    prompt_from_wire(frame_to_wire("a", DTYPE, ids_of(np.arange(10)), remember_as=kept_id), memory)
    with pytest.raises(InvalidTokens, match="another namespace"):
        prompt_from_wire(frame_to_wire("b", DTYPE, ids_of(np.arange(12)), base=(kept_id, 10)), memory)
    with pytest.raises(InvalidTokens, match="longer than kept prompt"):
        prompt_from_wire(frame_to_wire("a", DTYPE, ids_of(np.arange(12)), base=(kept_id, 11)), memory)


def test_the_memory_drops_least_recently_used_prompts_within_its_budget() -> None:
    memory = PromptMemory(25)
    ids = [new_id() for _ in range(4)]
    for prompt_id in ids[:2]:
        memory.remember(prompt_id, "t", 1, b"\0\0" * 10, 10)
    memory.recall(ids[0], "t", 1, 2)  # ids[1] is now the least recently used
    memory.remember(ids[2], "t", 1, b"\0\0" * 10, 10)
    assert memory.tokens == 20 and len(memory) == 2
    with pytest.raises(UnknownPrompt):
        memory.recall(ids[1], "t", 1, 2)
    memory.remember(ids[3], "t", 1, b"\0\0" * 26, 26)  # larger than the whole budget: not kept
    assert memory.tokens == 20
    with pytest.raises(UnknownPrompt):
        memory.recall(ids[3], "t", 1, 2)
    with pytest.raises(InvalidArgument, match="max_tokens"):
        PromptMemory(-1)


def test_a_zero_budget_keeps_nothing() -> None:
    memory = PromptMemory(0)
    prompt_from_wire(frame_to_wire("t", DTYPE, ids_of(np.arange(10)), remember_as=new_id()), memory)
    assert len(memory) == 0


def test_the_frame_checks_its_own_arguments() -> None:
    ids = ids_of(np.arange(10))
    with pytest.raises(InvalidArgument, match="prompt id is 16 bytes"):
        frame_to_wire("t", DTYPE, ids, remember_as=b"short")
    with pytest.raises(InvalidArgument, match="does not fit"):
        frame_to_wire("t", DTYPE, ids, base=(new_id(), 11))
    with pytest.raises(InvalidArgument, match="does not fit"):
        frame_to_wire("t", DTYPE, ids, base=(new_id(), 0))


def test_sent_prompts_offer_the_longest_kept_prefix_of_the_same_node_and_namespace() -> None:
    sent = SentPrompts(max_bytes=1 << 20)
    base = ids_of(np.arange(1_000))
    longer = ids_of(np.arange(1_500))
    sent.record("n1", "t", b"a" * 16, base)
    sent.record("n1", "t", b"b" * 16, longer)
    query = ids_of(np.arange(2_000))
    assert sent.base_for("n1", "t", query) == (b"b" * 16, len(longer))
    assert sent.base_for("n1", "t", ids_of(np.arange(1_200))) == (b"a" * 16, len(base))
    assert sent.base_for("n2", "t", query) is None
    assert sent.base_for("n1", "u", query) is None
    diverged = ids_of(np.concatenate([np.arange(999), [7, 7]]))
    assert sent.base_for("n1", "t", diverged) is None
    sent.forget("n1", "t", b"b" * 16, query)
    assert sent.base_for("n1", "t", query) == (b"a" * 16, len(base))
    sent.forget_node("n1")
    assert sent.base_for("n1", "t", query) is None


def test_sent_prompts_stay_within_their_budget() -> None:
    prompt = ids_of(np.arange(100))  # 200 bytes
    sent = SentPrompts(max_bytes=500)
    for i in range(PER_FAMILY + 2):  # one family over budget: its latest prompts stay
        sent.record("n1", "t", bytes([i]) * 16, prompt)
    assert sent.base_for("n1", "t", prompt) == (bytes([PER_FAMILY + 1]) * 16, 200)
    many = SentPrompts(max_bytes=1 << 20)
    for i in range(PER_FAMILY + 2):
        many.record("n1", "t", bytes([i]) * 16, ids_of(np.arange(100 + i)))
    assert many.base_for("n1", "t", ids_of(np.arange(100))) is None  # only the latest PER_FAMILY stay
    assert many.base_for("n1", "t", ids_of(np.arange(102))) == (bytes([2]) * 16, 204)
    other = ids_of(np.arange(1, 101))
    sent.record("n1", "t", b"z" * 16, other)  # over budget: the least recently used family goes
    assert sent.base_for("n1", "t", prompt) is None
    assert sent.base_for("n1", "t", other) == (b"z" * 16, 200)
    sent.record("n1", "t", b"y" * 16, ids_of(np.arange(300)))  # larger than the budget: ignored
    assert sent.base_for("n1", "t", ids_of(np.arange(300))) is None


def test_a_node_that_keeps_refusing_references_is_paused_then_retried() -> None:
    now = [0.0]
    sent = SentPrompts(max_bytes=1 << 20, clock=lambda: now[0])
    prompt = ids_of(np.arange(100))
    for attempt in range(REFUSALS_BEFORE_PAUSE):
        assert not sent.paused("n1")
        sent.record("n1", "t", bytes([attempt]) * 16, prompt)
        sent.forget("n1", "t", bytes([attempt]) * 16, prompt)
    assert sent.paused("n1") and not sent.paused("n2")
    assert sent.base_for("n1", "t", prompt) is None
    now[0] += REFUSAL_PAUSE_S
    assert not sent.paused("n1")
    # An accepted reference ends a run of refusals.
    for _ in range(2):
        sent.forget("n1", "t", b"x" * 16, prompt)
    sent.accepted("n1")
    sent.forget("n1", "t", b"x" * 16, prompt)
    assert not sent.paused("n1")
