"""Build the prefix registry a :class:`~routing.config.RegistryConfig` asks for."""

from __future__ import annotations

import time
from collections.abc import Callable

from routing.config import RegistryConfig
from routing.memory_registry import InMemoryRegistry
from routing.redis_registry import RedisPrefixRegistry
from routing.registry import PrefixRegistry


def open_registry(
    config: RegistryConfig, *, clock: Callable[[], float] = time.monotonic
) -> PrefixRegistry:
    """``backend: memory`` -> :class:`InMemoryRegistry`; ``redis`` -> :class:`RedisPrefixRegistry`
    (connects lazily: an unreachable server surfaces as ``RegistryUnavailable`` on first use)."""
    if config.backend == "memory":
        return InMemoryRegistry(config, clock=clock)
    return RedisPrefixRegistry(config, clock=clock)
