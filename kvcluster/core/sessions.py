"""Multi-turn conversations on top of the paged KV engine and the prefix index.

A conversation keeps one engine sequence holding its whole history. Each turn's prompt and
response are appended to it (:meth:`Session.extend`) and the history is inserted into the
prefix index, so the next turn, a fork, or the same conversation reopened after it was closed
finds everything before it already computed::

    turn 1   [system | user1 | reply1]                  extend: sequence + index
    turn 2   [system | user1 | reply1 | user2 | reply2]  only user2 + reply2 are new
    fork     shares every block of the history by reference (copy-on-write on its first
             append into the shared partial last block)

The first turn of a new conversation starts from the longest cached prefix in its namespace
(e.g. a shared system prompt): those pages are shared, not written again. A session idle for
``idle_ttl_s`` (injected monotonic clock) is closed by :meth:`SessionManager.expire_idle`;
closing frees the sequence while the index keeps the cached blocks (evictable from then on);
closing it as ``ended`` also puts what only it cached first in line for eviction.

Errors leave the state unchanged: bad tokens or K/V raise before anything is appended; an
unknown or closed conversation raises :class:`UnknownSession`.
Concurrency: not thread-safe; the owner (the node engine) serialises every call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from kvcluster.core.kv_engine import PagedKVEngine, SequenceId
from kvcluster.core.prefix_index import PrefixIndex
from kvcluster.core.prefix_records import InsertResult
from kvcluster.core.token_input import TokenInput, as_token_array
from kvcluster.errors import InvalidArgument, InvalidKV, UnknownSession

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TurnResult:
    """What one :meth:`Session.extend` did.

    ``reused_tokens`` of the turn's tokens were already cached and shared instead of written
    (only on a conversation's first turn); ``total_tokens`` is the history's length after the
    turn; ``cached`` is what inserting the history into the index did.
    """

    reused_tokens: int
    total_tokens: int
    cached: InsertResult


@dataclass(slots=True)
class _Conversation:
    conversation_id: str
    namespace: str
    seq_id: SequenceId | None
    last_used: float
    turns: int = 0
    #: Tokens of the history that are not its own: found cached on its first turn, or
    #: inherited from the conversation it was forked from.
    shared_tokens: int = 0


class Session:
    """A handle on one open conversation of a :class:`SessionManager`.

    It holds no state of its own: after the conversation is closed or expires, every method
    raises :class:`UnknownSession`.
    """

    __slots__ = ("_manager", "conversation_id")

    def __init__(self, manager: SessionManager, conversation_id: str) -> None:
        self._manager = manager
        self.conversation_id = conversation_id

    def __repr__(self) -> str:
        return f"Session({self.conversation_id!r}, open={self.is_open})"

    @property
    def is_open(self) -> bool:
        return self._manager.is_open(self.conversation_id)

    @property
    def namespace(self) -> str:
        return self._manager._get(self.conversation_id).namespace

    @property
    def sequence_id(self) -> SequenceId | None:
        """The engine sequence holding the history (None before the first turn)."""
        return self._manager._get(self.conversation_id).seq_id

    @property
    def num_tokens(self) -> int:
        return self._manager.num_tokens(self.conversation_id)

    @property
    def turns(self) -> int:
        return self._manager._get(self.conversation_id).turns

    def tokens(self) -> npt.NDArray[np.int64]:
        return self._manager.tokens(self.conversation_id)

    def read_kv(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        return self._manager.read_kv(self.conversation_id, start, end)

    def extend(self, tokens: TokenInput, kv: torch.Tensor) -> TurnResult:
        return self._manager.extend(self.conversation_id, tokens, kv)

    def fork(self, new_conversation_id: str) -> Session:
        return self._manager.fork(self.conversation_id, new_conversation_id)

    def close(self, *, ended: bool = False) -> bool:
        return self._manager.close(self.conversation_id, ended=ended)


class SessionManager:
    """Open conversations over one engine and the prefix index of its pool.

    ``idle_ttl_s`` (> 0): a conversation not extended, forked or reopened for that long is
    closed by :meth:`expire_idle`. ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        engine: PagedKVEngine,
        index: PrefixIndex,
        idle_ttl_s: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if index.pool is not engine.pool:
            raise InvalidArgument("the prefix index must index the engine's own block pool")
        if index.block_size != engine.block_size:
            raise InvalidArgument(
                f"index block size {index.block_size} differs from the engine's {engine.block_size}"
            )
        if isinstance(idle_ttl_s, bool) or not isinstance(idle_ttl_s, int | float) or not idle_ttl_s > 0:
            raise InvalidArgument(f"idle_ttl_s must be a number of seconds > 0, got {idle_ttl_s!r}")
        self._engine = engine
        self._index = index
        self._idle_ttl = float(idle_ttl_s)
        self._clock = clock
        self._conversations: dict[str, _Conversation] = {}

    def __len__(self) -> int:
        return len(self._conversations)

    def conversations(self) -> list[str]:
        return list(self._conversations)

    def is_open(self, conversation_id: str) -> bool:
        return conversation_id in self._conversations

    # --- lifecycle -----------------------------------------------------------------------------

    def open(self, conversation_id: str, namespace: str = "default") -> Session:
        """Open (or, idempotently, return) the conversation ``conversation_id``.

        Reopening an open conversation counts as activity; reopening it under another
        namespace raises :class:`InvalidArgument`.
        """
        _check_id(conversation_id)
        if type(namespace) is not str:
            raise InvalidArgument(f"namespace must be a string, got {namespace!r}")
        existing = self._conversations.get(conversation_id)
        now = self._clock()
        if existing is not None:
            if existing.namespace != namespace:
                raise InvalidArgument(
                    f"conversation {conversation_id!r} is open in namespace {existing.namespace!r}, "
                    f"not {namespace!r}"
                )
            existing.last_used = now
        else:
            self._conversations[conversation_id] = _Conversation(conversation_id, namespace, None, now)
        return Session(self, conversation_id)

    def get(self, conversation_id: str) -> Session:
        self._get(conversation_id)
        return Session(self, conversation_id)

    def close(self, conversation_id: str, *, ended: bool = False) -> bool:
        """Free the conversation's sequence; the index keeps its cached blocks. ``ended``: the
        conversation will not be reopened, so what only it cached (past the prefix it shared
        when it began or was forked) is evicted first from now on (:meth:`PrefixIndex.demote`);
        an idle or plain close keeps its blocks in their usual place for a reopening. False if
        the conversation is not open (closing twice is harmless)."""
        conversation = self._conversations.pop(conversation_id, None)
        if conversation is None:
            return False
        if conversation.seq_id is not None:
            history = self._engine.tokens(conversation.seq_id)
            self._engine.free(conversation.seq_id)
            if ended:
                self._index.demote(history, conversation.namespace, keep_tokens=conversation.shared_tokens)
        return True

    def expire_idle(self) -> list[str]:
        """Close every conversation idle for ``idle_ttl_s`` or more; return their ids."""
        now = self._clock()
        idle = [c.conversation_id for c in self._conversations.values() if now - c.last_used >= self._idle_ttl]
        for conversation_id in idle:
            logger.debug("closing idle conversation %s", conversation_id)
            self.close(conversation_id)
        return idle

    # --- turns ---------------------------------------------------------------------------------

    def extend(self, conversation_id: str, tokens: TokenInput, kv: torch.Tensor) -> TurnResult:
        """Append a turn's ``tokens`` (a prompt, a response, or both) with their K/V
        ``(layers, kv_components, len(tokens), kv_heads, head_dim)``, then cache the history.

        On the first turn, the longest cached prefix of ``tokens`` in the namespace is shared
        instead of written (``kv`` must still cover every token; its rows for the shared part
        are not used). All or nothing up to the append; :class:`CapacityError`,
        :class:`InvalidTokens`, :class:`InvalidKV` or :class:`ContextTooLong` change nothing.
        """
        conversation = self._get(conversation_id)
        array = as_token_array(tokens)
        if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[2] != array.size:
            shape = tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
            raise InvalidKV(f"kv must cover the {array.size} tokens of the turn on dim 2, got {shape}")
        engine = self._engine
        reused = 0
        if conversation.seq_id is None:
            match = self._index.lookup(array, conversation.namespace)
            reused = match.matched_tokens
            conversation.seq_id = engine.create_sequence(
                array, kv[:, :, reused:], shared_blocks=match.block_ids, shared_tokens=reused
            )
            conversation.shared_tokens = reused
        else:
            engine.append(conversation.seq_id, array, kv)
        seq = conversation.seq_id
        cached = self._index.insert(engine.tokens(seq), engine.block_table(seq), conversation.namespace)
        conversation.turns += 1
        conversation.last_used = self._clock()
        return TurnResult(reused, engine.num_tokens(seq), cached)

    def fork(self, conversation_id: str, new_conversation_id: str) -> Session:
        """A new conversation sharing ``conversation_id``'s history by reference."""
        conversation = self._get(conversation_id)
        _check_id(new_conversation_id)
        if new_conversation_id in self._conversations:
            raise InvalidArgument(f"conversation {new_conversation_id!r} is already open")
        seq = None if conversation.seq_id is None else self._engine.fork(conversation.seq_id)
        now = self._clock()
        conversation.last_used = now
        self._conversations[new_conversation_id] = _Conversation(
            new_conversation_id, conversation.namespace, seq, now, conversation.turns,
            shared_tokens=0 if seq is None else self._engine.num_tokens(seq),
        )
        return Session(self, new_conversation_id)

    # --- reads ---------------------------------------------------------------------------------

    def num_tokens(self, conversation_id: str) -> int:
        seq = self._get(conversation_id).seq_id
        return 0 if seq is None else self._engine.num_tokens(seq)

    def tokens(self, conversation_id: str) -> npt.NDArray[np.int64]:
        seq = self._get(conversation_id).seq_id
        return np.empty(0, dtype=np.int64) if seq is None else self._engine.tokens(seq)

    def read_kv(self, conversation_id: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        seq = self._get(conversation_id).seq_id
        if seq is None:
            if start == 0 and end in (None, 0):
                layers, comps, _, heads, dim = self._engine.pages.page_shape
                return torch.empty((layers, comps, 0, heads, dim), dtype=self._engine.pages.dtype)
            raise InvalidArgument(f"conversation {conversation_id!r} has no tokens yet")
        return self._engine.read_kv(seq, start, end)

    def _get(self, conversation_id: str) -> _Conversation:
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            raise UnknownSession(f"no open conversation {conversation_id!r} (never opened, closed or expired)")
        return conversation


def _check_id(conversation_id: object) -> None:
    if not isinstance(conversation_id, str) or not conversation_id:
        raise InvalidArgument(f"a conversation id must be a non-empty string, got {conversation_id!r}")
