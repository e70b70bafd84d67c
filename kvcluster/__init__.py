"""kvcluster: a distributed, tiered KV-cache cluster for LLM inference on Ray.

The package is imported lazily: ``import kvcluster`` does no work and pulls in neither Ray
nor torch until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_config": "kvcluster.config",
    "KVClusterConfig": "kvcluster.config",
    "ModelSpec": "kvcluster.model_spec",
    "connect": "kvcluster.connection",
    "connect_local": "kvcluster.connection",
    "deploy": "kvcluster.deploy",
    "local_cluster": "kvcluster.local_cluster",
    "KVClient": "kvcluster.client",
    "RouteResult": "kvcluster.client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvcluster' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "KVClient",
    "KVClusterConfig",
    "ModelSpec",
    "RouteResult",
    "__version__",
    "connect",
    "connect_local",
    "deploy",
    "load_config",
    "local_cluster",
]
