"""CRC16 slot computation against known Redis vectors and redis-py's own implementation."""

from __future__ import annotations

import random

import pytest
from redis.crc import key_slot as redis_py_key_slot

from routing.cluster_slots import crc16_xmodem, hash_tag, key_slot


def test_crc16_check_value() -> None:
    # The CRC16-XMODEM check value of "123456789" (Redis' cluster spec, Appendix A).
    assert crc16_xmodem(b"123456789") == 0x31C3
    assert key_slot("123456789") == 12739


def test_hash_tags_follow_the_cluster_spec() -> None:
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    assert key_slot("{user1000}.following") == key_slot("user1000")
    assert hash_tag(b"foo{}{bar}") == b"foo{}{bar}"  # empty tag: whole key
    assert hash_tag(b"foo{{bar}}zap") == b"{bar"  # first { to the next }
    assert hash_tag(b"foo{bar}{zap}") == b"bar"  # only the first tag counts
    assert hash_tag(b"no-close{tag") == b"no-close{tag"


@pytest.mark.parametrize("key", ["", "foo", "bar", "hello", "kvc:f:default:{00ff}", "a{b}c", "{}"])
def test_agrees_with_redis_py(key: str) -> None:
    assert key_slot(key) == redis_py_key_slot(key.encode())


def test_agrees_with_redis_py_on_random_binary_keys() -> None:
    rng = random.Random(0)
    for _ in range(500):
        key = rng.randbytes(rng.randrange(40))
        assert key_slot(key) == redis_py_key_slot(key)
