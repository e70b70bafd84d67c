"""``kill -9`` mid-write: a restart recovers every completely written page and nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tiers.nvme_tier import NvmeTier

PAGE = 256 * 1024
SLOTS = 48

# The child writes page after page (key k's bytes are a function of k), keeping at most 12
# alive by freeing the oldest, and reports each step only after the call returned.
_CHILD = textwrap.dedent(
    """
    import sys, torch
    from tiers.nvme_tier import NvmeTier

    def page(key):
        return torch.randint(0, 256, (%(page)d,), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(key))

    tier = NvmeTier([sys.argv[1]], %(slots)d, %(page)d, o_direct="auto", io_threads=2)
    live = []
    for key in range(1_000_000):
        if len(live) == 12:
            old_key, old_slot = live.pop(0)
            print("freeing", old_key, flush=True)
            tier.free([old_slot])
            print("freed", old_key, flush=True)
        slot = int(tier.allocate(1)[0])
        print("writing", key, flush=True)
        tier.write(slot, page(key), tag=key)
        print("done", key, flush=True)
        live.append((key, slot))
    """
) % {"page": PAGE, "slots": SLOTS}


def _page(key: int) -> torch.Tensor:
    return torch.randint(0, 256, (PAGE,), dtype=torch.uint8, generator=torch.Generator().manual_seed(key))


@pytest.mark.parametrize("kill_after", [5, 40])
def test_kill_9_mid_write_recovers_exactly_the_completed_pages(tmp_path: Path, kill_after: int) -> None:
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    events: list[tuple[str, int]] = []
    assert child.stdout is not None
    try:
        for line in child.stdout:
            what, key = line.split()
            events.append((what, int(key)))
            if what == "writing" and int(key) == kill_after:
                # The next page is in flight (or about to be): kill without warning.
                os.kill(child.pid, signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait()
        rest = child.stdout.read()
    for line in rest.splitlines():  # lines the child printed before it died
        what, key = line.split()
        events.append((what, int(key)))

    done = {k for what, k in events if what == "done"}
    started = {k for what, k in events if what == "writing"}
    freeing = {k for what, k in events if what == "freeing"}
    freed = {k for what, k in events if what == "freed"}
    must = done - freeing  # completed and never (being) freed
    may = (done | started) - freed  # the page in flight may have completed its journal record
    assert kill_after in started and must

    tier = NvmeTier([tmp_path], SLOTS, PAGE, o_direct="auto")
    try:
        recovered = tier.recovered_pages()
        assert must <= set(recovered), f"lost completed pages {sorted(must - set(recovered))}"
        # Nothing that never completed, except perhaps the page in flight or a freed page whose
        # lazy DEL record had not reached the journal (both with exactly their own bytes).
        assert set(recovered) <= may | freed
        assert set(recovered) - done <= {max(started)}
        for key, slot in recovered.items():
            assert torch.equal(tier.read(slot), _page(key)), f"page {key} recovered with wrong bytes"
        assert tier.stats().checksum_failures <= 1  # at most the torn page in flight
        assert tier.num_used == len(recovered)
    finally:
        tier.close()
