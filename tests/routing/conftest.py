"""Fixtures for the routing tests: a fake clock, real redis-server processes, registry builders.

A real server is started with ``redis-server --port P --save "" --appendonly no --daemonize
yes`` on a free port and stopped with ``redis-cli -p P shutdown nosave``; tests that need one
are skipped with a clear reason when redis-server is not installed.
"""

from __future__ import annotations

import itertools
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from routing.config import RegistryConfig
from routing.memory_registry import InMemoryRegistry
from routing.redis_registry import RedisPrefixRegistry
from routing.registry import PrefixRegistry

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
NO_REDIS_REASON = "redis-server/redis-cli not installed (apt-get install redis-server)"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A throwaway redis-server on a free loopback port (no persistence)."""

    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER and REDIS_CLI, NO_REDIS_REASON
        subprocess.run(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "yes"],
            check=True, capture_output=True,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                self._probe().ping()
                return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        assert REDIS_CLI
        subprocess.run([REDIS_CLI, "-p", str(self.port), "shutdown", "nosave"],
                       capture_output=True, timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self._probe().ping()
            except redis.exceptions.ConnectionError:
                return
            time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, retry=Retry(NoBackoff(), 1))

    def _probe(self) -> redis.Redis:
        # No retries: redis-py's default backoff would turn each refused probe into seconds.
        return redis.Redis(port=self.port, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))


def _start_server() -> Iterator[RedisServer]:
    if not (REDIS_SERVER and REDIS_CLI):
        pytest.skip(NO_REDIS_REASON)
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One real server per test module."""
    yield from _start_server()


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
def raw(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """A bare Redis client, on fakeredis and (emptied first) on the module's real server."""
    if request.param == "fakeredis":
        client: redis.Redis = fakeredis.FakeRedis()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        client = server.client()
        client.flushall()
    yield client
    client.close()


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    """A real server for one test (fault tests stop and restart it)."""
    yield from _start_server()


_prefixes = itertools.count()


@dataclass
class RegistryEnv:
    """Builds registries of one backend and moves their time forward."""

    kind: str
    make: Callable[..., PrefixRegistry]
    advance: Callable[[float], None]
    raw: redis.Redis | None = None  # the Redis behind the registry, for white-box tests


BACKENDS = ["memory", "fakeredis", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(params=BACKENDS)
def registry_env(request: pytest.FixtureRequest) -> Iterator[RegistryEnv]:
    """The same contract, three backends. Redis backends judge time on the server clock,
    so ``advance`` sleeps for them; tests keep the TTLs they exercise well under a second."""
    kind = request.param
    if kind == "memory":
        clock = FakeClock()

        def make_memory(**overrides: Any) -> PrefixRegistry:
            registry = InMemoryRegistry(RegistryConfig(**_defaults(overrides)), clock=clock)
            return registry

        yield RegistryEnv(kind, make_memory, clock.advance)
        return
    if kind == "fakeredis":
        raw = fakeredis.FakeRedis()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        raw = server.client()
        raw.flushall()
    prefix = f"t{next(_prefixes)}"

    def make_redis(**overrides: Any) -> PrefixRegistry:
        config = RegistryConfig(**_defaults({"key_prefix": prefix, **overrides}))
        registry = RedisPrefixRegistry(config, client=raw)
        return registry

    yield RegistryEnv(kind, make_redis, time.sleep, raw)
    raw.close()


def _defaults(overrides: dict[str, Any]) -> dict[str, Any]:
    return {"index_stride_blocks": 1, **overrides}
