"""``kvcluster status`` against nodes that hang: every node is asked at once and the waits
share one deadline, so hung nodes cost one timeout in all (a fake of the Ray calls and the
clock: no Ray processes, no sleeping)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import ray

import kvcluster.node_status as node_status
from kvcluster.node_status import collect_status


@dataclass
class FakeClock:
    now: float = 100.0

    def monotonic(self) -> float:
        return self.now


@dataclass
class FakeActor:
    text: str | None  # None: the node hangs

    @property
    def metrics_text(self) -> Any:
        return SimpleNamespace(remote=lambda: self)


def test_hung_nodes_cost_one_timeout_in_all(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    waits: list[float] = []

    def get(ref: FakeActor, timeout: float | None = None) -> str:
        assert timeout is not None
        waits.append(timeout)
        if ref.text is None:
            clock.now += timeout  # waited the whole time it was given
            raise ray.exceptions.GetTimeoutError("timed out")
        return ref.text

    actors = {"a-hung": FakeActor(None), "b-ok": FakeActor(""), "c-hung": FakeActor(None), "d-hung": FakeActor(None)}
    monkeypatch.setattr(node_status, "find_nodes", lambda namespace: actors)
    monkeypatch.setattr(node_status, "time", SimpleNamespace(monotonic=clock.monotonic), raising=False)
    monkeypatch.setattr(node_status, "ray", SimpleNamespace(get=get, exceptions=ray.exceptions))
    rows = collect_status("ns", timeout_s=10.0)
    assert [(row.node_id, row.error) for row in rows] == [
        ("a-hung", "GetTimeoutError"), ("b-ok", None), ("c-hung", "GetTimeoutError"), ("d-hung", "GetTimeoutError"),
    ]
    assert sum(waits) == pytest.approx(10.0)  # one timeout in all, not one per hung node
    assert clock.now - 100.0 == pytest.approx(10.0)
