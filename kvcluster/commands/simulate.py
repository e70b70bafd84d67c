"""``kvcluster simulate``: replay a request trace through the router and simulated node caches.

    kvcluster simulate [--trace FILE] [--nodes 8] [--capacity-fraction 0.05] [--config FILE]
                       [--prefill-tokens-per-s 10000] [--decode-tokens-per-s 30] [--seed 0]
                       [--limit N] [--policies router,round_robin,random,consistent_hash]
                       [--node-cache lru|index:lru|index:lfu|index:reuse] [--session-ends] [--json]

The trace is Mooncake-format JSONL (``timestamp`` ms, ``input_length``, ``output_length``,
``hash_ids`` of 512-token blocks); by default ``../shared/traces/synthetic_trace.jsonl`` when
it exists. Each node caches ``--capacity-fraction`` of the trace's unique blocks: in the
simulator's block LRU (``--node-cache lru``, the default), or in the node engine's own prefix
index under one of its eviction policies (``index:lru``, ``index:lfu``, ``index:reuse``; the
last learns from each request's generated length). The router's settings come from
``router:`` in ``--config``. Prints, per policy, the block hit
rate, its share of an infinite single cache's, tokens saved, load imbalance (max / mean
requests per node) and routing overhead per request. ``--session-ends`` tells each node when a
conversation it served is over, as ``ChatSession.end()`` does; the trace has no conversation
ids, so the ends are derived from the whole trace (``routing.simulator.conversation_ends``).
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvcluster.commands.options import add_config_option, config_from
from kvcluster.errors import InvalidArgument
from kvcluster.sim_cache import INDEX_CACHE_PREFIX, IndexBlockCache
from routing.simulator import (
    MOONCAKE_BLOCK_TOKENS,
    POLICIES,
    CacheFactory,
    LRUBlockCache,
    SimulationConfig,
    SimulationReport,
    load_mooncake_trace,
    simulate,
)

_TRACE = Path("traces") / "synthetic_trace.jsonl"


def default_trace() -> Path | None:
    """``../shared/traces/synthetic_trace.jsonl`` beside the checkout or the working dir."""
    for base in (Path(__file__).resolve().parents[3] / "shared", Path.cwd().parent / "shared"):
        candidate = base / _TRACE
        if candidate.is_file():
            return candidate
    return None


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="replay a trace: router vs round-robin/random/consistent-hash",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--trace", metavar="FILE", help="Mooncake-format JSONL trace")
    parser.add_argument("--nodes", type=int, default=8, help="simulated nodes (default 8)")
    parser.add_argument(
        "--capacity-fraction", type=float, default=0.05,
        help="each node caches this share of the trace's unique blocks (default 0.05)",
    )
    parser.add_argument("--block-tokens", type=int, default=MOONCAKE_BLOCK_TOKENS,
                        help="tokens per trace block (default 512)")
    parser.add_argument("--prefill-tokens-per-s", type=float, default=10_000.0,
                        help="service model: uncached prompt tokens per second (default 10000)")
    parser.add_argument("--decode-tokens-per-s", type=float, default=30.0,
                        help="service model: output tokens per second per request (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    parser.add_argument("--limit", type=int, help="replay only the first N requests")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help=f"comma-separated subset of {','.join(POLICIES)}")
    parser.add_argument("--node-cache", default="lru", metavar="CACHE",
                        help="each node's cache: lru (the simulator's, default) or index:POLICY "
                        "(the node engine's prefix index; POLICY lru, lfu or reuse)")
    parser.add_argument("--session-ends", action="store_true",
                        help="tell each node when a conversation served there ends, as ChatSession.end() "
                        "does (derived from the whole trace, which has no conversation ids)")
    add_config_option(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    trace = Path(args.trace) if args.trace else default_trace()
    if trace is None:
        raise InvalidArgument("no --trace given and ../shared/traces/synthetic_trace.jsonl not found")
    if not trace.is_file():
        raise InvalidArgument(f"trace file {trace} does not exist")
    if args.limit is not None and args.limit < 1:
        raise InvalidArgument(f"--limit must be >= 1, got {args.limit}")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    config = SimulationConfig(
        nodes=args.nodes,
        capacity_fraction=args.capacity_fraction,
        block_tokens=args.block_tokens,
        prefill_tokens_per_s=args.prefill_tokens_per_s,
        decode_tokens_per_s=args.decode_tokens_per_s,
        seed=args.seed,
        router=config_from(args).router,
        session_ends=args.session_ends,
    )
    report = simulate(load_mooncake_trace(trace, limit=args.limit), config, policies,
                      cache_factory=node_cache_factory(args.node_cache))
    print(json.dumps(report_as_dict(report, trace), indent=2) if args.json else report.table())
    return 0


def node_cache_factory(name: str) -> CacheFactory:
    """The simulated nodes' cache called ``name`` (see the module docstring)."""
    if name == "lru":
        return LRUBlockCache
    if name.startswith(INDEX_CACHE_PREFIX):
        policy = name[len(INDEX_CACHE_PREFIX):]
        IndexBlockCache(1, policy)  # a bad policy name fails here, before the replay
        return functools.partial(IndexBlockCache, policy=policy)
    raise InvalidArgument(f"--node-cache must be lru or index:POLICY (lru, lfu or reuse), got {name!r}")


def report_as_dict(report: SimulationReport, trace: Path) -> dict[str, Any]:
    config = asdict(report.config)
    config["router"] = report.config.router.model_dump()
    return {
        "trace": str(trace),
        "config": config,
        "requests": report.requests,
        "unique_blocks": report.unique_blocks,
        "capacity_blocks_per_node": report.capacity_blocks,
        "infinite": {"hit_rate": report.infinite_hit_rate, "tokens_saved": report.infinite_tokens_saved},
        "policies": {
            r.policy: {
                "hit_rate": r.hit_rate,
                "share_of_infinite": (r.hit_rate / report.infinite_hit_rate
                                      if report.infinite_hit_rate else 0.0),
                "tokens_saved": r.tokens_saved,
                "imbalance": r.imbalance,
                "requests_per_node": list(r.requests_per_node),
                "overhead_us": {"mean": r.overhead_us_mean, "p50": r.overhead_us_p50,
                                "p99": r.overhead_us_p99},
                "registry_us_mean": r.registry_us_mean,
                "overload_overrides": r.overload_overrides,
                "no_match_fallbacks": r.no_match_fallbacks,
            }
            for r in report.results
        },
    }
