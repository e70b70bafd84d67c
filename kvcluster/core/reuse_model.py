"""How likely a stored request is to be continued, learned online (the ``reuse`` policy's model).

A request is counted when its K/V is stored, in a bucket of two features the engine has
then: ``log2(generated tokens + 1)`` (``-1`` when the caller gave no length) and whether its
prompt extended a prefix already cached. It counts as *continued* once a later prompt's
match ends inside what it stored (a chat's next turn, a retry). A bucket's chance is the
Laplace estimate ``(continued + 1) / (requests + 2)`` over everything seen so far.

Why these features: on the Mooncake trace (``../shared/traces``) 82% of prompt families never
come back; of first requests with short answers (< 64 tokens) 58% are continued, with long
answers 5%, and later turns 70-80% whatever their length (``benchmarks/cache_policy_study.py``).

Concurrency: not thread-safe; the prefix index's owner serialises every call.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict

import numpy as np
import xxhash

from kvcluster.errors import InvalidArgument

#: The bucket of a request: (log2(generated tokens + 1), or -1 when unknown; extends a prefix).
Bucket = tuple[int, bool]

#: Length buckets above this one are merged (2**24 generated tokens is beyond any context).
MAX_LENGTH_BUCKET = 24


def check_generated_tokens(generated_tokens: object) -> int | None:
    """``generated_tokens`` as an int (or None); :class:`InvalidArgument` unless it is an
    integer >= 0 or None."""
    if generated_tokens is None:
        return None
    if isinstance(generated_tokens, bool) or not isinstance(generated_tokens, int | np.integer) or generated_tokens < 0:
        raise InvalidArgument(f"generated_tokens must be an integer >= 0 or None, got {generated_tokens!r}")
    return int(generated_tokens)


class ReuseRecord:
    """One stored request: its bucket, and whether a later prompt continued it yet. The
    nodes it stored or touched last refer to it, so it lives as long as they do."""

    __slots__ = ("bucket", "continued")

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self.continued = False


class ReuseModel:
    """Per-bucket counts of stored and continued requests (see the module docstring)."""

    def __init__(self) -> None:
        self._requests: Counter[Bucket] = Counter()
        self._continued: Counter[Bucket] = Counter()
        self._total_requests = 0
        self._total_continued = 0

    @staticmethod
    def bucket(generated_tokens: int | None, extends_prefix: bool) -> Bucket:
        """The bucket of a request that generated ``generated_tokens`` (None: unknown)."""
        length = check_generated_tokens(generated_tokens)
        if length is None:
            return (-1, bool(extends_prefix))
        return (min(int(math.log2(length + 1)), MAX_LENGTH_BUCKET), bool(extends_prefix))

    def count(self, record: ReuseRecord) -> None:
        """Count a stored request (once it is stored: a failed store is not counted)."""
        self._requests[record.bucket] += 1
        self._total_requests += 1

    def credit(self, record: ReuseRecord | None) -> None:
        """A later prompt's match ended in what ``record``'s request stored (once each)."""
        if record is not None and not record.continued:
            record.continued = True
            self._continued[record.bucket] += 1
            self._total_continued += 1

    def log_chance(self, bucket: Bucket) -> float:
        """log of the estimated chance that a request of ``bucket`` is continued."""
        return math.log((self._continued[bucket] + 1) / (self._requests[bucket] + 2))

    def neutral_log_chance(self) -> float:
        """The same over every request: for uses whose bucket is not known (a lookup runs
        before its request has generated anything)."""
        return math.log((self._total_continued + 1) / (self._total_requests + 2))

    def chances(self) -> dict[Bucket, tuple[int, int]]:
        """``bucket -> (requests, continued)`` so far (stats, tests)."""
        return {b: (n, self._continued[b]) for b, n in sorted(self._requests.items())}


class StoredRequests:
    """The last few stored requests of each prompt family (the prompt's first block), so
    that a continuation is credited even after the continued request's blocks were evicted.

    Learning only through cached nodes would miss exactly the requests the policy got wrong:
    on the Mooncake trace that costs 3 points of hit rate in one cache and 5 behind the
    router (``benchmarks/cache_policy_study.py``). A request is remembered by its length and
    the xxh3 digest of its last block (``family_bytes`` of token ids); a later prompt of the
    same family continues it when the block ending at that length has that digest. Two
    blocks stand for the whole prefix, so a check costs two small hashes however long the
    prompt: a learning signal only (a wrong credit would skew one bucket's estimate, never
    what is cached or served). Bounded: ``max_families`` families (least recently stored
    dropped first), ``per_family`` requests each.
    """

    def __init__(self, family_bytes: int, max_families: int, per_family: int = 4) -> None:
        if family_bytes < 1 or max_families < 1 or per_family < 1:
            raise InvalidArgument("family_bytes, max_families and per_family must be >= 1")
        self._family_bytes = family_bytes
        self._max_families = max_families
        self._per_family = per_family
        self._families: OrderedDict[int, list[tuple[int, int, ReuseRecord]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._families)

    def remember(self, tokens: bytes, record: ReuseRecord) -> None:
        """``record``'s request stored ``tokens`` (native int64 bytes: lengths are in bytes)."""
        family = xxhash.xxh3_64_intdigest(tokens[: self._family_bytes])
        entries = self._families.get(family)
        if entries is None:
            entries = self._families[family] = []
            if len(self._families) > self._max_families:
                self._families.popitem(last=False)
        else:
            self._families.move_to_end(family)
        size = len(tokens)
        entries.insert(0, (size, xxhash.xxh3_64_intdigest(tokens[max(0, size - self._family_bytes) : size]), record))
        del entries[self._per_family :]

    def continued_by(self, tokens: bytes) -> list[ReuseRecord]:
        """The remembered requests, not yet credited, whose tokens ``tokens`` starts with."""
        entries = self._families.get(xxhash.xxh3_64_intdigest(tokens[: self._family_bytes]))
        if not entries:
            return []
        size, tail = len(tokens), self._family_bytes
        return [
            record
            for length, digest, record in entries
            if not record.continued and length <= size
            and xxhash.xxh3_64_intdigest(tokens[max(0, length - tail) : length]) == digest
        ]
