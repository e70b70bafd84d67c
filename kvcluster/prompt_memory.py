"""Long prompts cross the wire once: the node keeps recent ones, the client refers to them.

A client sending a long prompt (``cluster.prompt_delta_min_tokens`` or more) to a node asks
it to keep the prompt's ids under a fresh random id (:class:`PromptMemory`, bounded by
``cluster.prompt_memory_tokens``). The next prompt to that node that starts with a kept one
(the same prompt again, or a chat's next turn) is sent as ``(kept id, its length)`` plus the
new ids only; :class:`SentPrompts` is the client's record of what it asked each node to keep.

Correctness never depends on the two agreeing: the client checks that the new prompt really
starts with the kept ids (a byte comparison of its own copy), and a node that has dropped the
base raises :class:`~kvcluster.errors.UnknownPrompt` before doing anything, after which the
client sends the prompt in full. Ids are random (never a hash of the tokens), so no crafted
prompt can collide with another client's.

Thread-safety: both classes lock their state; nodes and clients call them from many threads.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kvcluster.errors import InvalidArgument, InvalidTokens, UnknownPrompt

#: Bytes of a prompt id (random, chosen by the client).
PROMPT_ID_BYTES = 16
#: Leading id bytes that group a client's sent prompts into families (candidates for a base).
FAMILY_BYTES = 64
#: Kept prompts a client remembers per (node, family): the latest turns of a conversation.
PER_FAMILY = 4
#: A node that refuses this many references in a row keeps no prompts for us (its budget is
#: 0 or far smaller than ours): the client stops asking it to keep any for REFUSAL_PAUSE_S, so
#: a misconfigured node costs one extra round trip a few times, not on every call.
REFUSALS_BEFORE_PAUSE = 3
REFUSAL_PAUSE_S = 60.0


@dataclass(frozen=True, slots=True)
class _Kept:
    namespace: str
    id_type: int
    ids: bytes


class PromptMemory:
    """The prompts a node keeps for its clients, least recently used dropped first, within a
    budget of ``max_tokens`` ids (0: keep nothing)."""

    def __init__(self, max_tokens: int) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise InvalidArgument(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
        self._max_tokens = max_tokens
        self._kept: OrderedDict[bytes, tuple[_Kept, int]] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def tokens(self) -> int:
        return self._tokens

    def remember(self, prompt_id: bytes, namespace: str, id_type: int, ids: bytes, num_tokens: int) -> None:
        """Keep ``ids`` (``num_tokens`` ids of wire type ``id_type``) under ``prompt_id``; a
        prompt larger than the whole budget is not kept."""
        if num_tokens > self._max_tokens:
            return
        with self._lock:
            previous = self._kept.pop(prompt_id, None)
            if previous is not None:
                self._tokens -= previous[1]
            self._kept[prompt_id] = (_Kept(namespace, id_type, ids), num_tokens)
            self._tokens += num_tokens
            while self._tokens > self._max_tokens:
                _, (_, dropped) = self._kept.popitem(last=False)
                self._tokens -= dropped

    def recall(self, prompt_id: bytes, namespace: str, id_type: int, num_bytes: int) -> bytes:
        """The first ``num_bytes`` id bytes of the kept prompt ``prompt_id``.

        :class:`UnknownPrompt` if it is not kept (any more); :class:`InvalidTokens` if it was
        kept for another namespace or id type, or is shorter than asked."""
        with self._lock:
            entry = self._kept.get(prompt_id)
            if entry is None:
                raise UnknownPrompt(f"prompt {prompt_id.hex()} is not kept here (any more); send it in full")
            self._kept.move_to_end(prompt_id)
        kept = entry[0]
        if kept.namespace != namespace or kept.id_type != id_type:
            raise InvalidTokens(f"prompt {prompt_id.hex()} was kept for another namespace or id type")
        if num_bytes > len(kept.ids):
            raise InvalidTokens(
                f"a base of {num_bytes} id bytes is longer than kept prompt {prompt_id.hex()} ({len(kept.ids)})"
            )
        return kept.ids if num_bytes == len(kept.ids) else kept.ids[:num_bytes]


class SentPrompts:
    """What a client asked each node to keep, so a later prompt can refer to it.

    At most ``max_bytes`` of ids are remembered (least recently used families dropped first),
    and :data:`PER_FAMILY` prompts per (node, family). A node that refuses
    :data:`REFUSALS_BEFORE_PAUSE` references in a row is paused (:meth:`paused`).
    """

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_bytes = max_bytes
        self._clock = clock
        self._families: OrderedDict[tuple[str, str, bytes], list[tuple[bytes, bytes]]] = OrderedDict()
        self._bytes = 0
        self._refusals: dict[str, int] = {}
        self._paused_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def paused(self, node: str) -> bool:
        """Whether ``node`` is not asked to keep prompts now (it kept refusing references)."""
        until = self._paused_until.get(node)
        if until is None:
            return False
        if self._clock() < until:
            return True
        with self._lock:
            self._paused_until.pop(node, None)
        return False

    def accepted(self, node: str) -> None:
        """``node`` resolved a reference: its run of refusals ends."""
        if node in self._refusals:
            with self._lock:
                self._refusals.pop(node, None)

    def base_for(self, node: str, namespace: str, ids: bytes) -> tuple[bytes, int] | None:
        """``(prompt id, id bytes)`` of the longest prompt kept by ``node`` that ``ids`` starts
        with, if any."""
        key = (node, namespace, ids[:FAMILY_BYTES])
        with self._lock:
            sent = self._families.get(key)
            if not sent:
                return None
            self._families.move_to_end(key)
            best = None
            for prompt_id, kept in sent:
                if len(kept) <= len(ids) and (best is None or len(kept) > best[1]) and ids.startswith(kept):
                    best = (prompt_id, len(kept))
            return best

    def record(self, node: str, namespace: str, prompt_id: bytes, ids: bytes) -> None:
        """``node`` was asked to keep ``ids`` under ``prompt_id``."""
        if len(ids) > self._max_bytes:
            return
        key = (node, namespace, ids[:FAMILY_BYTES])
        with self._lock:
            sent = self._families.setdefault(key, [])
            self._families.move_to_end(key)
            sent.insert(0, (prompt_id, ids))
            self._bytes += len(ids)
            while len(sent) > PER_FAMILY:
                self._bytes -= len(sent.pop()[1])
            while self._bytes > self._max_bytes:
                oldest = next(iter(self._families))
                if oldest == key:  # the only family left: drop its oldest prompts
                    self._bytes -= len(sent.pop()[1])
                else:
                    self._bytes -= sum(len(kept) for _, kept in self._families.pop(oldest))

    def forget(self, node: str, namespace: str, prompt_id: bytes, ids: bytes) -> None:
        """``node`` does not keep ``prompt_id`` (it answered :class:`UnknownPrompt`); after
        :data:`REFUSALS_BEFORE_PAUSE` such answers in a row it is paused."""
        with self._lock:
            refusals = self._refusals.get(node, 0) + 1
            self._refusals[node] = refusals
        if refusals >= REFUSALS_BEFORE_PAUSE:
            self.forget_node(node)
            with self._lock:
                self._refusals.pop(node, None)
                self._paused_until[node] = self._clock() + REFUSAL_PAUSE_S
            return
        key = (node, namespace, ids[:FAMILY_BYTES])
        with self._lock:
            sent = self._families.get(key)
            if sent is None:
                return
            kept = [entry for entry in sent if entry[0] != prompt_id]
            self._bytes -= sum(len(entry[1]) for entry in sent) - sum(len(entry[1]) for entry in kept)
            if kept:
                self._families[key] = kept
            else:
                del self._families[key]

    def forget_node(self, node: str) -> None:
        """Drop every record for ``node`` (it restarted or was replaced)."""
        with self._lock:
            for key in [key for key in self._families if key[0] == node]:
                self._bytes -= sum(len(kept) for _, kept in self._families.pop(key))
