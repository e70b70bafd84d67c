"""The registry key of every full block a node holds, and the events that describe them.

A node publishes each full block under its chain hash, the family (its chain's first key)
and its depth in the chain, so an evicted or demoted block can be unregistered or moved under
the key the registry knows it by. :class:`BlockKeyTable` keeps those keys for the device pool
in numpy columns indexed by block id: registering a 32K-token prefix (2,048 blocks) is a
handful of vectorised assignments instead of 2,048 objects in a dict (~2.5 ms of a
node-to-node migration's ~7 ms of work on arrival, measured here before this table).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvcluster.errors import InvalidArgument
from routing.block_hashing import BLOCK_HASH_DTYPE, BlockHashArray
from routing.registry import BlockEvent, Tier

TIERS_BY_NAME = {"gpu": Tier.GPU, "cpu": Tier.CPU, "nvme": Tier.NVME}

_UNSET = -1


@dataclass(frozen=True, slots=True)
class BlockKey:
    """A full cached block's place in the registry: chain hash, family and depth."""

    block_hash: bytes
    family: bytes
    position: int
    namespace: str

    def event(self, tier: str | None) -> BlockEvent:
        """The block moved to ``tier`` (a spill tier's name), or removed when ``None``."""
        return run_event([self], tier)


def run_event(run: list[BlockKey], tier: str | None) -> BlockEvent:
    """One event for a run of blocks of one chain at consecutive depths, all moved to
    ``tier`` (or removed when ``None``)."""
    first = run[0]
    hashes = [key.block_hash for key in run]
    if tier is None:
        return BlockEvent.removed(hashes, first_position=first.position, family=first.family,
                                  namespace=first.namespace)
    return BlockEvent.moved(hashes, TIERS_BY_NAME[tier], first_position=first.position,
                            family=first.family, namespace=first.namespace)


def coalesced_events(keys: list[BlockKey], tiers: list[str | None]) -> list[BlockEvent]:
    """Events for ``keys[i]`` moved to ``tiers[i]``: one per run of consecutive depths of one
    chain with one outcome (an evicted prefix is one run), instead of one per block."""
    events: list[BlockEvent] = []
    run: list[BlockKey] = []
    run_tier: str | None = None
    for key, tier in zip(keys, tiers, strict=True):
        if run and (tier != run_tier or key.family != run[-1].family or key.namespace != run[-1].namespace
                    or key.position != run[-1].position + 1):
            events.append(run_event(run, run_tier))
            run = []
        if not run:
            run_tier = tier
        run.append(key)
    if run:
        events.append(run_event(run, run_tier))
    return events


class BlockKeyTable:
    """Block id -> :class:`BlockKey` for the blocks of a pool of ``num_blocks``, and the
    reverse question, whether a chain hash is on a device block now (:meth:`holds`).

    The reverse map is a dict of the hashes' bytes (~0.1 us a block when a prefix is keyed):
    a spill written or dropped after its block came back to the device must not move or
    remove the block's registry entry, and the node asks that for each spilled block.

    Not thread-safe: the node calls it under its own lock.
    """

    def __init__(self, num_blocks: int) -> None:
        self._hashes = np.zeros(num_blocks, dtype=BLOCK_HASH_DTYPE)
        self._positions = np.full(num_blocks, _UNSET, dtype=np.int64)
        # (family, namespace) of the chain: one shared tuple per registered prefix.
        self._chains: npt.NDArray[np.object_] = np.full(num_blocks, None, dtype=object)
        self._count = 0
        self._block_of: dict[bytes, int] = {}  # chain hash -> the device block keyed by it

    def __len__(self) -> int:
        return self._count

    def assign(self, block_ids: npt.NDArray[np.int64], hashes: BlockHashArray,
               positions: npt.NDArray[np.int64], family: bytes, namespace: str) -> None:
        """Key block ``block_ids[i]`` as depth ``positions[i]`` of the chain of ``family`` in
        ``namespace``, hash ``hashes[i]``; a block keyed before is re-keyed."""
        if not (block_ids.shape == hashes.shape == positions.shape):
            raise InvalidArgument(
                f"block ids {block_ids.shape}, hashes {hashes.shape} and positions "
                f"{positions.shape} must have one shape"
            )
        if not block_ids.size:
            return
        rekeyed = self._positions[block_ids] != _UNSET
        if rekeyed.any():
            for block_id, old_hash in zip(block_ids[rekeyed].tolist(),
                                          self._hashes[block_ids[rekeyed]].tolist(), strict=True):
                self._unmap(old_hash, block_id)
        self._count += int(np.count_nonzero(~rekeyed))
        self._block_of.update(zip(hashes.tolist(), block_ids.tolist(), strict=True))
        self._hashes[block_ids] = hashes
        self._positions[block_ids] = positions
        chain = np.empty(1, dtype=object)
        chain[0] = (family, namespace)  # one object broadcast, never unpacked as a row
        self._chains[block_ids] = chain

    def pop(self, block_id: int) -> BlockKey | None:
        """The key of ``block_id``, forgotten; ``None`` if it has none (a partial block)."""
        position = int(self._positions[block_id])
        if position == _UNSET:
            return None
        self._positions[block_id] = _UNSET
        family, namespace = self._chains[block_id]
        self._chains[block_id] = None
        self._count -= 1
        block_hash = self._hashes[block_id].tobytes()
        self._unmap(block_hash, block_id)
        return BlockKey(block_hash, family, position, namespace)

    def holds(self, block_hash: bytes) -> bool:
        """Whether a device block is keyed by ``block_hash`` now."""
        return block_hash in self._block_of

    def _unmap(self, block_hash: bytes, block_id: int) -> None:
        # Only if the hash still names this block (a later assign may have re-pointed it).
        if self._block_of.get(block_hash) == block_id:
            del self._block_of[block_hash]

    def held(self) -> list[BlockKey]:
        """Every key held, in block id order."""
        held = np.flatnonzero(self._positions != _UNSET)
        hashes = self._hashes[held].tolist()
        return [
            BlockKey(block_hash, family, position, namespace)
            for block_hash, position, (family, namespace) in zip(
                hashes, self._positions[held].tolist(), self._chains[held].tolist(), strict=True
            )
        ]
