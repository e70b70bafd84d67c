"""The one exception hierarchy of kvcluster, tiers and routing.

Every error the project raises derives from :class:`KVClusterError`. ``tiers`` and ``routing``
import this module (and nothing else from ``kvcluster``) so that a caller can catch one root.
This module imports nothing from the project and does no work at import time.

Rules (see docs/architecture.md):

- expected outcomes *return* (a cache miss, ``None`` from an allocator that is full);
- misuse *raises* a subclass of :class:`InvalidArgument` whose message names the culprit;
- errors that a caller can retry later (a node or Redis gone) set ``retryable = True``;
- external exceptions (redis-py, Ray, OSError) are translated at the boundary, never leaked.
"""

from __future__ import annotations

from collections.abc import Sequence


class KVClusterError(Exception):
    """Root of every error raised by kvcluster."""

    retryable: bool = False


# --- misuse ---------------------------------------------------------------------------------


class InvalidArgument(KVClusterError, ValueError):
    """A caller passed a bad value. The state of the callee is unchanged."""


class InvalidTokens(InvalidArgument):
    """Token ids that are empty, not integers, negative or outside the vocabulary."""


class InvalidKV(InvalidArgument):
    """K/V tensors or pages of the wrong shape, dtype or device."""


class ContextTooLong(InvalidArgument):
    """A sequence would exceed the configured maximum context length."""


class NotFound(KVClusterError, KeyError):
    """An id (sequence, session, slot, lease, node) that is unknown or already released."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep messages readable.
        return str(self.args[0]) if self.args else ""


class UnknownSequence(NotFound):
    """A sequence id that was never allocated or was already freed."""


class UnknownSession(NotFound):
    """A conversation id with no live session (never opened, closed or expired)."""


class LeaseError(NotFound):
    """A lease that was released, expired or belongs to another node or namespace."""


class UnknownPrompt(NotFound):
    """A prompt frame continues a prompt the node no longer keeps (or never kept): send the
    prompt in full. Raised before the node changes anything."""


# --- capacity -------------------------------------------------------------------------------


class CapacityError(KVClusterError):
    """Not enough free memory and nothing that can be freed; nothing was changed."""


class PinBudgetExceeded(CapacityError):
    """Pinning more would exceed the pin budget that keeps pins from starving the cache."""


# --- configuration --------------------------------------------------------------------------


class ConfigError(KVClusterError, ValueError):
    """A configuration that cannot be used. ``problems`` holds one line per problem."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        text = message if not self.problems else message + "\n" + "\n".join(
            f"  - {p}" for p in self.problems
        )
        super().__init__(text)


class ConfigDrift(ConfigError):
    """A node whose block size, hash algorithm, model fingerprint or salt differs from the cluster's."""


# --- tiers ----------------------------------------------------------------------------------


class TierError(KVClusterError):
    """A failure inside a storage tier."""


class PageCorrupt(TierError):
    """A page whose checksum does not match: it was dropped and counted, never returned."""


class TierIOError(TierError):
    """An I/O error (ENOSPC, EIO) on a tier. The page stayed where it was."""

    retryable = True


# --- routing --------------------------------------------------------------------------------


class RoutingError(KVClusterError):
    """A failure in hashing, the prefix registry or the router."""


class RegistryUnavailable(RoutingError):
    """The prefix registry cannot be reached. Routing falls back to affinity."""

    retryable = True


class RegistryDataError(RoutingError):
    """A registry entry that does not decode; it is skipped and counted."""


class FencedEpoch(RoutingError):
    """A node published with an epoch older than its current one (it was restarted)."""


# --- cluster --------------------------------------------------------------------------------


class ClusterError(KVClusterError):
    """A failure of the Ray cluster layer."""


class NodeUnavailable(ClusterError):
    """A node actor that died or cannot be reached; route elsewhere and retry."""

    retryable = True


class PagesCorrupt(PageCorrupt):
    """Some pages of a batch failed their checksum. ``slots`` lists them; none was returned.

    The other pages of the batch were read (or written) normally.
    """

    def __init__(self, message: str, slots: Sequence[int]) -> None:
        self.slots = list(slots)
        super().__init__(message)


# --- optional dependencies ------------------------------------------------------------------


class MissingDependency(KVClusterError, ImportError):
    """An optional extra (``pip install 'kvcluster[hf]'``...) that is not installed."""


# --- routing (appended) ---------------------------------------------------------------------


class NoLiveNodes(RoutingError):
    """The registry knows no live node (among the candidates) to route a request to."""

    retryable = True


# --- workload analysis (appended) -----------------------------------------------------------


class InvalidWorkload(InvalidArgument):
    """A workload file (JSONL prompts or a block trace) that cannot be read or parsed; the
    message names the file and the line."""
