"""open_registry builds the backend the configuration names."""

from __future__ import annotations

from routing.config import RegistryConfig
from routing.memory_registry import InMemoryRegistry
from routing.redis_registry import RedisPrefixRegistry
from routing.registry import PrefixRegistry
from routing.registry_factory import open_registry


def test_backends() -> None:
    memory = open_registry(RegistryConfig())
    assert isinstance(memory, InMemoryRegistry) and isinstance(memory, PrefixRegistry)
    redis_backed = open_registry(RegistryConfig(backend="redis", url="redis://127.0.0.1:1/0"))
    assert isinstance(redis_backed, RedisPrefixRegistry) and isinstance(redis_backed, PrefixRegistry)
    assert redis_backed.index_stride == 16
