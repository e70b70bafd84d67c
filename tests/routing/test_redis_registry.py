"""Redis-only behaviour: garbage in keys, hash-tag slots, URLs, error translation, memory."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import redis

from kvcluster.errors import ConfigError, RegistryDataError, RegistryUnavailable
from routing.block_hashing import BlockHashArray, BlockHasher
from routing.cluster_slots import key_slot
from routing.config import RegistryConfig
from routing.redis_registry import RedisPrefixRegistry, encode_ops, load_scripts
from routing.registry import BlockEvent, EventBatch, NodeLoad, PrefixHolding, Tier
from tests.routing.conftest import RedisServer, free_port

HASHER = BlockHasher("xxh3_128", 4)
_prefixes = itertools.count()


def chain(seed: int, blocks: int = 8) -> BlockHashArray:
    return HASHER.hash_chain(np.arange(blocks * 4, dtype=np.int32) + seed * 10_000)


def make(raw: redis.Redis, **overrides: object) -> RedisPrefixRegistry:
    config = RegistryConfig(key_prefix=f"r{next(_prefixes)}", index_stride_blocks=1, **overrides)  # type: ignore[arg-type]
    return RedisPrefixRegistry(config, client=raw)


def test_every_lua_script_documents_keys_argv_and_return() -> None:
    for name, source in load_scripts().items():
        body = source.split(f"-- {name}.lua", 1)
        assert len(body) == 2, name
        assert "-- Returns" in body[1], name
        assert "ARGV[" in body[1] or name == "nodes", name
        assert "KEYS[" in body[1] or name in ("clear_namespace", "stats"), name


def test_lookup_keys_share_the_family_slot(raw: redis.Redis) -> None:
    registry = make(raw)
    full = chain(1)
    family = full[0].tobytes()
    key = registry.family_key("tenant", family)
    assert key.endswith("{" + family.hex() + "}")
    assert key_slot(key) == key_slot(family.hex()) == key_slot(registry.family_key("other", family))
    # the node table's keys share one slot too
    slots = {key_slot(k) for k in (registry.pending_key("a"), "r:{nodes}", "x:{nodes}:incarnations")}
    assert len(slots) == 1
    # a batch's ops name the family keys of its events, nothing else
    events = [BlockEvent.stored(full, Tier.GPU, namespace="tenant"),
              BlockEvent.stored(chain(2), Tier.CPU, namespace="tenant")]
    families, blob = encode_ops(events, 1, registry.family_key)
    assert families == [registry.family_key("tenant", full[0].tobytes()),
                        registry.family_key("tenant", chain(2)[0].tobytes())]
    assert len(blob) == 1 + 2 + sum(2 + len(f) for f in families) + 4 + 16 * 20


def test_garbage_entries_are_skipped_and_counted(raw: redis.Redis) -> None:
    registry = make(raw)
    epoch = registry.register_node("a")
    full = chain(3)
    registry.publish(EventBatch("a", epoch, 1, (BlockEvent.stored(full, Tier.GPU),)))
    key = registry.family_key("default", full[0].tobytes())
    raw.hset(key, full[4].tobytes(), b"\x00\x01")  # 2 bytes: not a holder record
    assert registry.longest_prefix(full) == {"a": PrefixHolding(4, 4, 0, 0)}
    assert registry.malformed_skipped == 1
    raw.hset(key, full[2].tobytes(), b"\x00\x01\x09")  # unknown tier 9 for an unknown holder
    raw.hset(key, full[1].tobytes(), raw.hget(key, full[1].tobytes()) + b"\x00\x00\x00")
    assert registry.longest_prefix(full) == {"a": PrefixHolding(2, 2, 0, 0)}
    # a key of the wrong type where a family hash should be
    other = chain(4)
    raw.set(registry.family_key("default", other[0].tobytes()), b"junk")
    before = registry.malformed_skipped
    assert registry.longest_prefix(other) == {}
    assert registry.malformed_skipped == before + 1
    stats = registry.stats()
    assert stats.families == 1 and stats.malformed_skipped >= before + 2
    # publishing into that family replaces the garbage (counted) instead of failing
    counted = registry.malformed_skipped
    registry.publish(EventBatch("a", epoch, 2, (BlockEvent.stored(other[:3], Tier.CPU),)))
    assert registry.malformed_skipped == counted + 1
    assert registry.longest_prefix(other) == {"a": PrefixHolding(3, 0, 3, 0)}
    # the sweep deletes malformed fields and records of forgotten incarnations
    registry.sweep()
    assert raw.hget(key, full[4].tobytes()) is None


def test_garbage_node_records_are_skipped(raw: redis.Redis) -> None:
    registry = make(raw)
    registry.register_node("a")
    raw.hset(f"{registry.config.key_prefix}:{{nodes}}", "b", b"not a record")
    raw.hset(f"{registry.config.key_prefix}:{{nodes}}", "c", b"1 2 3")
    assert set(registry.live_nodes()) == {"a"}
    assert registry.malformed_skipped == 2
    # a node whose record is garbage is told to register again, not crashed on
    assert registry.heartbeat("b", 1, NodeLoad()) is False
    assert registry.needs_resync("b", 1) is True


def test_wrong_types_surface_as_data_errors(raw: redis.Redis) -> None:
    registry = make(raw)
    raw.set(f"{registry.config.key_prefix}:{{nodes}}", b"junk")
    with pytest.raises(RegistryDataError, match="register"):
        registry.register_node("a")
    with pytest.raises(RegistryDataError):
        registry.live_nodes()


def test_scripts_reload_after_script_flush(raw: redis.Redis) -> None:
    registry = make(raw)
    epoch = registry.register_node("a")
    raw.script_flush()
    assert registry.heartbeat("a", epoch, NodeLoad(1, 2, 3)) is True
    registry.publish(EventBatch("a", epoch, 1, (BlockEvent.stored(chain(5), Tier.CPU),)))
    raw.script_flush()
    assert registry.longest_prefix(chain(5))["a"].cpu_blocks == 8


def test_url_with_password_tls_and_db() -> None:
    registry = RedisPrefixRegistry(
        RegistryConfig(backend="redis", url="rediss://:s3cret@redis.internal:6380/2?ssl_cert_reqs=none")
    )
    pool = registry._client.connection_pool
    assert pool.connection_class is redis.SSLConnection
    kwargs = pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == ("redis.internal", 6380, 2, "s3cret")
    assert kwargs["socket_timeout"] == 0.5
    plain = RedisPrefixRegistry(RegistryConfig(backend="redis", url="redis://user:pw@localhost:7000/0"))
    assert plain._client.connection_pool.connection_class is redis.Connection
    assert plain._client.connection_pool.connection_kwargs["username"] == "user"
    with pytest.raises(ConfigError):
        RedisPrefixRegistry(RegistryConfig())


def test_unreachable_server_raises_registry_unavailable() -> None:
    port = free_port()  # nothing listens there
    registry = RedisPrefixRegistry(
        RegistryConfig(backend="redis", url=f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.2,
                       index_stride_blocks=1)
    )
    calls = [
        lambda: registry.register_node("a"),
        lambda: registry.heartbeat("a", 1, NodeLoad()),
        lambda: registry.longest_prefix(chain(1)),
        lambda: registry.live_nodes(),
        lambda: registry.publish(EventBatch("a", 1, 1, ())),
        lambda: registry.publish_many([EventBatch("a", 1, 1, ())]),
        lambda: registry.needs_resync("a", 1),
        lambda: registry.stats(),
        lambda: registry.clear_namespace("x"),
        lambda: registry.purge_node("a"),
    ]
    for call in calls:
        with pytest.raises(RegistryUnavailable) as info:
            call()
        assert info.value.retryable
        assert not isinstance(info.value, redis.exceptions.RedisError)


@pytest.mark.redis
def test_memory_per_entry_under_100_bytes(redis_server: RedisServer) -> None:
    """MEMORY USAGE of the block index over (block, node) entries, one holder per block:
    the worst case per entry (more holders share a field's overhead)."""
    registry = make(redis_server.client())
    epochs = {n: registry.register_node(n) for n in ("a", "b", "c", "d")}
    hasher = BlockHasher("xxh3_128", 1)
    batches = []
    for i, node in enumerate(itertools.islice(itertools.cycle(epochs), 40)):
        full = hasher.hash_chain(np.arange(500, dtype=np.int32) + i * 1000)
        batches.append(EventBatch(node, epochs[node], i // 4 + 1, (BlockEvent.stored(full, Tier.GPU),)))
    registry.publish_many(batches)
    stats = registry.stats()
    assert stats.entries == 40 * 500
    assert stats.bytes is not None
    assert stats.bytes / stats.entries <= 100
