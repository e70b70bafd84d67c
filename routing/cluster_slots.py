"""Redis Cluster key slots: CRC16-XMODEM of the key (or of its hash tag) modulo 16384.

The registry puts the prefix family in every family key as a hash tag (``...:{<family>}``),
so a Redis Cluster spreads families over shards while all keys of one family, and thus one
``longest_prefix`` lookup, live in a single slot. This module computes the slot exactly as
Redis does (``keyHashSlot`` in ``cluster.c``) so tests can prove that property.
"""

from __future__ import annotations

CLUSTER_SLOTS = 16384


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
        table.append(crc)
    return tuple(table)


_TABLE = _crc16_table()


def crc16_xmodem(data: bytes) -> int:
    """CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, no reflection."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def hash_tag(key: bytes) -> bytes:
    """The part of ``key`` that Redis hashes: the text between the first ``{`` and the next
    ``}`` when that is non-empty, else the whole key."""
    start = key.find(b"{")
    if start == -1:
        return key
    end = key.find(b"}", start + 1)
    if end == -1 or end == start + 1:
        return key
    return key[start + 1 : end]


def key_slot(key: bytes | str) -> int:
    """The Redis Cluster slot of ``key`` (0..16383)."""
    data = key.encode() if isinstance(key, str) else key
    return crc16_xmodem(hash_tag(data)) & (CLUSTER_SLOTS - 1)
