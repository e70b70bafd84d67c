"""The prefix registry on Redis: every mutation one Lua script, every lookup one round trip.

Key layout (``P`` = ``key_prefix``; see ``routing/README.md`` for the reasoning)::

    P:{nodes}                      hash  node id -> node record (fixed fields, see _prelude.lua)
    P:{nodes}:incarnations         hash  incarnation id -> node id
    P:{nodes}:next                 string counter for incarnation ids
    P:{nodes}:retired              hash  incarnation id -> sweep pass it was forgotten in
    P:{nodes}:sweep                hash  the incremental sweep's pass, cursors (sweep.lua)
    P:{nodes}:sweep:queue          list  family keys the sweep pass has still to read
    P:{nodes}:pending:<node id>    hash  seq -> ops blob buffered ahead of a gap   (TTL)
    P:f:<namespace>:{<family>}     hash  16-byte block key -> 3 bytes per holder:
                                         u16 incarnation | u8 tier                  (TTL)

A family hash holds every indexed block of the chains that share a first block, so its hash
tag (``{<family hex>}``) puts a whole lookup in one Redis Cluster slot. Nodes are named in
entries by a 16-bit *incarnation* id that changes with every registration: fencing a
restarted node's old epoch is forgetting its incarnation, and an entry costs 3 bytes per
holder on top of Redis' per-field overhead. A forgotten incarnation's records are reclaimed by
an incremental sweep: every renewing :meth:`RedisPrefixRegistry.heartbeat` runs one bounded
step of it (one more background EVALSHA; none on the lookup path). A forgotten id is not
reissued until a sweep pass that started after it was forgotten is complete, so a recycled
id never adopts stale records.

Scripts (``routing/lua``, each with a ``KEYS``/``ARGV``/return header) run through redis-py
:class:`~redis.commands.core.Script` (EVALSHA; reloaded on NOSCRIPT, e.g. after a restart).
Liveness is judged on the server clock: the client caches the node table (one extra round
trip at most every ``min(heartbeat, ttl - heartbeat) / 2`` seconds) with each node's expiry
converted to the local monotonic clock, so a node that stops renewing drops out of answers
within ``node_ttl_s`` whatever the cache age, and ``longest_prefix`` stays ONE ``EVALSHA``.

Every redis-py exception is translated at this boundary: connection problems and timeouts
become :class:`~kvcluster.errors.RegistryUnavailable`, anything else
:class:`~kvcluster.errors.RegistryDataError`. Thread-safety: redis-py's connection pool is
thread-safe; the node-table cache is replaced atomically under ``self._lock``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from kvcluster.errors import (
    ConfigError,
    FencedEpoch,
    InvalidArgument,
    RegistryDataError,
    RegistryUnavailable,
    RoutingError,
)
from routing.block_hashing import BlockHashArray
from routing.config import RegistryConfig
from routing.registry import (
    DEFAULT_NAMESPACE,
    MAX_EPOCH,
    BlockEvent,
    EventBatch,
    NodeInfo,
    NodeLoad,
    PrefixHolding,
    PublishResult,
    PublishStatus,
    RegistryStats,
    check_chain,
    check_name,
    check_positive_int,
    checkpoint_slice,
    lookup_probes,
    validate_batch,
)

logger = logging.getLogger(__name__)

SCRIPT_NAMES = (
    "register", "heartbeat", "nodes", "publish", "lookup", "purge", "sweep", "clear_namespace",
    "stats",
)
_OP_DTYPE = np.dtype([("kind", "u1"), ("tier", "u1"), ("family", ">u2"), ("key", "V16")])
_STATUS = {
    1: PublishStatus.APPLIED,
    2: PublishStatus.DUPLICATE,
    3: PublishStatus.BUFFERED,
    4: PublishStatus.OUT_OF_WINDOW,
    5: PublishStatus.RESYNC,
}
_FENCED = 6
# SCAN COUNT per script step: small where each key is read whole (a family can hold thousands
# of fields), so that no single step blocks Redis for long; large where keys are just unlinked.
_SCAN_COUNT_READ = 16
_SCAN_COUNT_UNLINK = 200
# The incremental sweep reads families page by page (HSCAN), so a step's work is bounded by
# its budget of fields whatever the families' sizes. Measured on redis-server 7.0: 1.6 ms per
# step of 1,024 fields (2.0 ms when every record is garbage), 12-16 ms per 8,192. A heartbeat
# carries a small step; sweep() takes bigger ones (publish batches run 10-55 ms). With 8 nodes
# beating every 2 s the heartbeats read ~4,000 fields a second: 1M entries in ~4 minutes.
_SWEEP_HEARTBEAT_BUDGET = 1024
_SWEEP_FULL_BUDGET = 8192
_SWEEP_SCAN_COUNT = 64
_UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
)


def load_scripts() -> dict[str, str]:
    """The Lua source of every script, each with the shared prelude prepended."""
    folder = resources.files("routing") / "lua"
    prelude = (folder / "_prelude.lua").read_text()
    return {name: prelude + "\n" + (folder / f"{name}.lua").read_text() for name in SCRIPT_NAMES}


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn redis-py exceptions into the registry's; nothing from redis-py leaks."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise RegistryUnavailable(f"redis registry unavailable during {what}: {exc}") from None
    except redis.exceptions.RedisError as exc:
        raise RegistryDataError(f"redis registry error during {what}: {exc}") from None


@dataclass(frozen=True, slots=True)
class _CachedNode:
    epoch: int
    incarnation: int
    load: NodeLoad
    age_at_fetch_s: float
    expires_at: float  # local clock


@dataclass(frozen=True, slots=True)
class _NodeTable:
    fetched_at: float  # local clock
    nodes: dict[str, _CachedNode]


def parse_node_record(raw: bytes) -> tuple[int, int, int, int, NodeLoad] | None:
    """``(epoch, incarnation, last_beat_ms, applied_through, load)`` or ``None`` if malformed."""
    try:
        fields = [int(x) for x in raw.decode("ascii").split()]
    except (UnicodeDecodeError, ValueError):
        return None
    if len(fields) != 8 or fields[0] != 1 or min(fields) < 0 or fields[1] < 1:
        return None
    _, epoch, incarnation, beat_ms, through, inflight, free, total = fields
    if not 1 <= incarnation <= 65535:
        return None
    return epoch, incarnation, beat_ms, through, NodeLoad(inflight, free, total)


class RedisPrefixRegistry:
    """A :class:`~routing.registry.PrefixRegistry` on Redis (see the module docstring).

    ``client`` overrides the connection built from ``config.url`` (tests pass fakeredis).
    ``clock`` is the local monotonic clock the node-table cache is kept on.
    """

    def __init__(
        self,
        config: RegistryConfig | Mapping[str, Any],
        *,
        client: redis.Redis | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(config, RegistryConfig):
            config = RegistryConfig.model_validate(dict(config))
        self._config = config
        if client is None:
            if not config.url:
                raise ConfigError("the redis registry needs registry.url (redis:// or rediss://)")
            try:
                client = redis.Redis.from_url(
                    config.url,
                    socket_timeout=config.socket_timeout_s,
                    socket_connect_timeout=config.socket_timeout_s,
                    # One immediate retry re-dials a pooled connection a restart broke; more
                    # would only stall the router, which falls back to affinity instead.
                    retry=Retry(NoBackoff(), 1),
                )
            except ValueError as exc:
                raise ConfigError(f"registry.url {config.url!r} is not a valid redis URL: {exc}") from None
        self._client = client
        self._clock = clock
        self._scripts: dict[str, Script] = {
            name: client.register_script(source) for name, source in load_scripts().items()
        }
        prefix = config.key_prefix
        self._nodes_key = f"{prefix}:{{nodes}}"
        self._incarnations_key = f"{prefix}:{{nodes}}:incarnations"
        self._counter_key = f"{prefix}:{{nodes}}:next"
        self._retired_key = f"{prefix}:{{nodes}}:retired"
        self._sweep_key = f"{prefix}:{{nodes}}:sweep"
        self._sweep_queue_key = f"{prefix}:{{nodes}}:sweep:queue"
        self._family_pattern = f"{prefix}:f:*"
        self._entry_ttl_ms = max(1, int(config.entry_ttl_s * 1000))
        hb, ttl = config.heartbeat_interval_s, config.node_ttl_s
        self._refresh_s = min(hb, ttl - hb) / 2
        self._lock = threading.Lock()
        self._table: _NodeTable | None = None
        self._malformed = 0

    @property
    def index_stride(self) -> int:
        return self._config.index_stride_blocks

    @property
    def config(self) -> RegistryConfig:
        return self._config

    @property
    def malformed_skipped(self) -> int:
        return self._malformed

    # --- key names ---------------------------------------------------------------------------

    def pending_key(self, node_id: str) -> str:
        return f"{self._config.key_prefix}:{{nodes}}:pending:{node_id}"

    def family_key(self, namespace: str, family: bytes) -> str:
        """The hash of a prefix family; ``{<family hex>}`` is its Redis Cluster hash tag."""
        return f"{self._config.key_prefix}:f:{namespace}:{{{family.hex()}}}"

    # --- plumbing ----------------------------------------------------------------------------

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        with translate_errors(name):
            return self._scripts[name](keys=list(keys), args=list(args))

    def _count_malformed(self, n: int) -> None:
        if n:
            with self._lock:
                self._malformed += n
            logger.warning("skipped %s malformed registry entries", n)

    def ping(self) -> float:
        """Seconds of one PING round trip (a health probe; used by the benchmark)."""
        start = time.perf_counter()
        with translate_errors("ping"):
            self._client.ping()
        return time.perf_counter() - start

    # --- nodes -------------------------------------------------------------------------------

    def register_node(self, node_id: str, *, previous_epoch: int = 0) -> int:
        check_name("node_id", node_id)
        if (isinstance(previous_epoch, bool) or not isinstance(previous_epoch, int)
                or not 0 <= previous_epoch < MAX_EPOCH):
            raise InvalidArgument(f"previous_epoch must be an integer in [0, 2**53 - 1), got {previous_epoch!r}")
        keys = [self._nodes_key, self._incarnations_key, self._counter_key,
                self.pending_key(node_id), self._retired_key, self._sweep_key]
        epoch, _ = _int_list(self._run("register", keys, [node_id, previous_epoch]), 2, "register")
        if epoch == 0:
            # Every free id awaits a sweep pass (no heartbeats swept for a whole lap of the
            # id counter): complete one here, in bounded steps, and try again.
            logger.warning("no incarnation id free until a sweep pass completes; sweeping now")
            self.sweep()
            epoch, _ = _int_list(self._run("register", keys, [node_id, previous_epoch]), 2, "register")
            if epoch == 0:
                raise RegistryDataError("no free incarnation id after a complete sweep pass")
        self._invalidate()
        return epoch

    def heartbeat(self, node_id: str, epoch: int, load: NodeLoad) -> bool:
        check_name("node_id", node_id)
        check_positive_int("epoch", epoch)
        if not isinstance(load, NodeLoad):
            raise InvalidArgument(f"load must be a NodeLoad, got {type(load).__name__}")
        reply = self._run(
            "heartbeat",
            [self._nodes_key],
            [node_id, int(epoch), load.inflight_requests, load.free_blocks, load.total_blocks],
        )
        values = _int_list(reply, None, "heartbeat")
        if values[0] == -1:
            raise FencedEpoch(f"node {node_id!r} renewed with epoch {epoch}; current is {values[1]}")
        self._invalidate()
        if values[0] == 1:
            # Each current node's heartbeat carries one bounded step of the sweep (a second,
            # background EVALSHA; never on the lookup path). It is housekeeping: a failed
            # step is logged and does not fail the heartbeat, whose renewal took effect.
            try:
                self.sweep_step()
            except RoutingError as exc:
                logger.warning("registry sweep step failed: %s", exc)
        return values[0] == 1

    def needs_resync(self, node_id: str, epoch: int) -> bool:
        check_name("node_id", node_id)
        with translate_errors("needs_resync"):
            raw = self._client.hget(self._nodes_key, node_id)
        parsed = parse_node_record(raw) if isinstance(raw, bytes) else None
        return parsed is None or parsed[0] != epoch

    def live_nodes(self) -> dict[str, NodeInfo]:
        table = self._node_table()
        now = self._clock()
        return {
            node_id: NodeInfo(node_id, node.epoch, node.load,
                              node.age_at_fetch_s + (now - table.fetched_at))
            for node_id, node in table.nodes.items()
            if now <= node.expires_at
        }

    def _invalidate(self) -> None:
        with self._lock:
            self._table = None

    def _node_table(self) -> _NodeTable:
        with self._lock:
            table = self._table
        now = self._clock()
        if table is not None and now - table.fetched_at < self._refresh_s:
            return table
        reply = self._run("nodes", [self._nodes_key], [])
        fetched_at = self._clock()
        if not isinstance(reply, list) or len(reply) % 2 != 1 or not isinstance(reply[0], int):
            raise RegistryDataError(f"nodes script returned {reply!r:.80}")
        server_ms = reply[0]
        ttl_ms = self._config.node_ttl_s * 1000
        nodes: dict[str, _CachedNode] = {}
        bad = 0
        for raw_id, raw in zip(reply[1::2], reply[2::2]):
            parsed = parse_node_record(raw) if isinstance(raw, bytes) else None
            try:
                node_id = raw_id.decode()
            except (AttributeError, UnicodeDecodeError):
                parsed = None
            if parsed is None:
                bad += 1
                continue
            epoch, incarnation, beat_ms, _, load = parsed
            age_ms = max(0, server_ms - beat_ms)
            nodes[node_id] = _CachedNode(
                epoch, incarnation, load, age_ms / 1000, fetched_at + (ttl_ms - age_ms) / 1000
            )
        self._count_malformed(bad)
        table = _NodeTable(fetched_at, nodes)
        with self._lock:
            self._table = table
        return table

    def purge_node(self, node_id: str) -> bool:
        check_name("node_id", node_id)
        reply = self._run(
            "purge",
            [self._nodes_key, self._incarnations_key, self.pending_key(node_id),
             self._retired_key, self._sweep_key],
            [node_id],
        )
        self._invalidate()
        if reply == 1:
            self.sweep()
        return reply == 1

    def sweep(self) -> int:
        """Run one complete sweep pass now, in bounded steps (each one script): reclaim the
        records of every incarnation forgotten before the call, drop malformed entries and
        release the retired ids. Restarts the shared pass (heartbeats' steps join it).
        Returns the records this call removed."""
        removed, started, done = self._sweep_once(_SWEEP_FULL_BUDGET, restart=True)
        while done < started:  # until this pass (or a later one someone restarted) is complete
            step, _, done = self._sweep_once(_SWEEP_FULL_BUDGET, restart=False)
            removed += step
        return removed

    def sweep_step(self, budget: int = _SWEEP_HEARTBEAT_BUDGET) -> int:
        """One bounded step (about ``budget`` hash fields) of the shared incremental sweep,
        as :meth:`heartbeat` runs. Returns the records removed."""
        check_positive_int("budget", budget)
        return self._sweep_once(budget, restart=False)[0]

    def _sweep_once(self, budget: int, *, restart: bool) -> tuple[int, int, int]:
        keys, args = self._sweep_call(budget, restart=restart)
        return self._sweep_result(self._run("sweep", keys, args))

    def _sweep_call(self, budget: int, *, restart: bool) -> tuple[list[str], list[Any]]:
        keys = [self._incarnations_key, self._retired_key, self._sweep_key, self._sweep_queue_key]
        return keys, [self._family_pattern, budget, 1 if restart else 0, _SWEEP_SCAN_COUNT]

    def _sweep_result(self, reply: Any) -> tuple[int, int, int]:
        """``(records removed, pass started last, pass completed last)`` of a sweep step."""
        removed, malformed, skipped, started, done = _int_list(reply, 5, "sweep")
        self._count_malformed(malformed + skipped)
        return removed, started, done

    # --- events ------------------------------------------------------------------------------

    def _publish_call(self, batch: EventBatch) -> tuple[list[str], list[Any]]:
        families, blob = encode_ops(batch.events, self.index_stride, self.family_key)
        keys = [self._nodes_key, self._incarnations_key, self.pending_key(batch.node_id), *families]
        args = [batch.node_id, int(batch.epoch), int(batch.seq), self._entry_ttl_ms,
                self._config.max_buffered_batches, blob]
        return keys, args

    def publish(self, batch: EventBatch) -> PublishResult:
        validate_batch(batch)
        keys, args = self._publish_call(batch)
        return self._publish_result(batch, self._run("publish", keys, args))

    def publish_many(self, batches: Sequence[EventBatch]) -> list[PublishResult]:
        """Publish in order in one pipelined round trip (each batch still one script).

        Every batch is attempted; if some were fenced, :class:`FencedEpoch` is raised after
        all were sent (the others took effect)."""
        calls = []
        for batch in batches:
            validate_batch(batch)
            calls.append(self._publish_call(batch))
        if not calls:
            return []
        script = self._scripts["publish"]
        with translate_errors("publish_many"):
            pipe = self._client.pipeline(transaction=False)
            for keys, args in calls:
                script(keys=keys, args=args, client=pipe)
            replies = pipe.execute()
        results: list[PublishResult] = []
        fenced: FencedEpoch | None = None
        for batch, reply in zip(batches, replies):
            try:
                results.append(self._publish_result(batch, reply))
            except FencedEpoch as exc:
                fenced = fenced or exc
        if fenced is not None:
            raise fenced
        return results

    def _publish_result(self, batch: EventBatch, reply: Any) -> PublishResult:
        status, through, applied, current, garbage = _int_list(reply, 5, "publish")
        self._count_malformed(garbage)
        if status == _FENCED:
            raise FencedEpoch(
                f"node {batch.node_id!r} published with epoch {batch.epoch}; current is {current}"
            )
        if status not in _STATUS:
            raise RegistryDataError(f"publish script returned unknown status {status}")
        return PublishResult(_STATUS[status], through, applied)

    # --- lookups -----------------------------------------------------------------------------

    def longest_prefix(
        self, hashes: BlockHashArray, namespace: str = DEFAULT_NAMESPACE
    ) -> dict[str, PrefixHolding]:
        chain = check_chain(hashes)
        check_name("namespace", namespace)
        stride = self.index_stride
        probes = lookup_probes(chain, stride)
        if probes.size == 0:
            return {}
        table = self._node_table()
        now = self._clock()
        live = {n.incarnation: node_id for node_id, n in table.nodes.items() if now <= n.expires_at}
        if not live:
            return {}
        live_blob = np.fromiter(live, dtype=">u2", count=len(live)).tobytes()
        reply = self._run(
            "lookup", [self.family_key(namespace, chain[0].tobytes())], [probes.tobytes(), live_blob]
        )
        values = _int_list(reply, None, "lookup")
        if (len(values) - 1) % 5:
            raise RegistryDataError(f"lookup script returned {len(values)} values")
        self._count_malformed(values[0])
        out: dict[str, PrefixHolding] = {}
        for i in range(1, len(values), 5):
            incarnation, count, gpu, cpu, nvme = values[i : i + 5]
            node_id = live.get(incarnation)
            if node_id is None or count <= 0 or gpu + cpu + nvme != count:
                self._count_malformed(1)
                continue
            out[node_id] = PrefixHolding(count * stride, gpu * stride, cpu * stride, nvme * stride)
        return out

    # --- maintenance -------------------------------------------------------------------------

    def clear_namespace(self, namespace: str) -> int:
        check_name("namespace", namespace)
        pattern = f"{self._config.key_prefix}:f:{namespace}:{{*"
        cursor: bytes | str = "0"
        deleted = 0
        while True:
            reply = self._run("clear_namespace", [], [cursor, pattern, _SCAN_COUNT_UNLINK])
            if not isinstance(reply, list) or len(reply) != 2:
                raise RegistryDataError(f"clear_namespace script returned {reply!r:.80}")
            cursor, deleted = reply[0], deleted + int(reply[1])
            if cursor in (b"0", "0"):
                return deleted

    def stats(self) -> RegistryStats:
        cursor: bytes | str = "0"
        totals = [0, 0, 0, 0, 0]
        supported = True
        while True:
            reply = self._run("stats", [], [cursor, self._family_pattern, _SCAN_COUNT_READ])
            if not isinstance(reply, list) or len(reply) != 7:
                raise RegistryDataError(f"stats script returned {reply!r:.80}")
            cursor = reply[0]
            for i in range(5):
                totals[i] += int(reply[i + 1])
            supported = supported and reply[6] == 1
            if cursor in (b"0", "0"):
                break
        families, blocks, entries, size, malformed = totals
        self._count_malformed(malformed)
        self._invalidate()
        table = self._node_table()
        now = self._clock()
        live = sum(1 for n in table.nodes.values() if now <= n.expires_at)
        return RegistryStats(len(table.nodes), live, families, blocks, entries,
                             size if supported else None, self._malformed)

    def used_memory(self) -> int:
        """The server's ``used_memory`` (INFO memory), for whole-server measurements."""
        with translate_errors("info"):
            return int(self._client.info("memory")["used_memory"])

    def close(self) -> None:
        with translate_errors("close"):
            self._client.close()


def encode_ops(
    events: Sequence[BlockEvent], stride: int, family_key: Callable[[str, bytes], str]
) -> tuple[list[str], bytes]:
    """The family keys and the fixed-field ops blob of ``events`` (format: publish.lua)."""
    names: dict[str, int] = {}
    chunks: list[bytes] = []
    count = 0
    for event in events:
        keys = event.hashes[checkpoint_slice(event.first_position, stride)]
        if keys.size == 0:
            continue
        name = family_key(event.namespace, event.family)
        index = names.setdefault(name, len(names))
        if index > 0xFFFF - 1:  # checked before the u16 field would overflow
            raise InvalidArgument(f"a batch may name at most 65535 families ({len(names)} given)")
        ops = np.empty(keys.size, dtype=_OP_DTYPE)
        ops["kind"] = event.kind.value
        ops["tier"] = 0 if event.tier is None else int(event.tier)
        ops["family"] = index
        ops["key"] = keys
        chunks.append(ops.tobytes())
        count += keys.size
    if count > 0xFFFFFFFF:
        raise InvalidArgument(f"a batch may carry at most {0xFFFFFFFF} operations ({count} given)")
    header = [b"\x01", len(names).to_bytes(2, "big")]
    for name in names:
        encoded = name.encode()
        header.append(len(encoded).to_bytes(2, "big") + encoded)
    header.append(count.to_bytes(4, "big"))
    return list(names), b"".join(header + chunks)


def _int_list(reply: Any, length: int | None, what: str) -> list[int]:
    if not isinstance(reply, list) or not all(isinstance(v, int) for v in reply) or (
        length is not None and len(reply) != length
    ) or not reply:
        raise RegistryDataError(f"{what} script returned an unexpected reply {reply!r:.80}")
    return reply
