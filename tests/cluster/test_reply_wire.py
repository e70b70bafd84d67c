"""Per-request replies cross the actor boundary as built-in values (msgpack, never pickle)."""

from __future__ import annotations

import msgpack

from kvcluster.node_types import LookupReply, StoreReply


def test_replies_survive_a_msgpack_round_trip() -> None:
    hit = LookupReply("node-a", "tenant", 1024, {"gpu": 60, "cpu": 4}, "ab" * 16, 30.0)
    miss = LookupReply("node-a", "default", 0, {}, None, 0.0)
    stored = StoreReply("node-b", "default", 2048, 512, 128)
    for reply in (hit, miss, stored):
        decoded = msgpack.unpackb(msgpack.packb(reply.to_wire()))  # a list, as msgpack gives
        assert isinstance(decoded, list)
        assert type(reply).from_wire(decoded) == reply
        assert type(reply).from_wire(reply) is reply
