"""``kvcluster plan``: KV memory per token, per block and per tier, and whether a load fits.

    kvcluster plan --config configs/local.yaml [--sequences 64] [--context 8192]
    kvcluster plan --model llama-3-8b [--context 32768] [--memory 80GiB] [--sequences 100]
                   [--block-size 16] [--dtype fp8_e4m3] [--tp 2] [--json]

With ``--config`` the model, block size, context and tiers come from the file (``--model``,
``--dtype``, ``--tp``, ``--block-size``, ``--context`` and ``--memory`` override it; ``--memory``
replaces the GPU tier). Without it one GPU of ``--memory`` (default 80 GiB) holds the cache.
Exit status: 0, or 1 when a planned load (``--sequences``) does not fit in the engine pool.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pydantic import ValidationError

from kvcluster.config import CacheConfig, load_config
from kvcluster.errors import InvalidArgument
from kvcluster.memory_calculator import MemoryPlan, plan_for_model, plan_from_config, render
from kvcluster.model_spec import PRESETS, ModelSpec, preset
from tiers.config import parse_byte_size

DEFAULT_MEMORY = "80GiB"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="KV memory per token/block/tier and whether a load fits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML configuration file (model, block size, tiers)")
    parser.add_argument("--model", help=f"built-in preset: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--context", type=int, help="tokens per sequence (default: max_context)")
    parser.add_argument(
        "--memory", help=f"KV memory of one GPU, e.g. 80GiB (default {DEFAULT_MEMORY} without --config)"
    )
    parser.add_argument("--sequences", type=int, help="planned concurrent sequences to check")
    parser.add_argument("--block-size", type=int, help="tokens per block (default 16)")
    parser.add_argument("--dtype", help="KV dtype: float32, float16, bfloat16, fp8_e4m3, fp8_e5m2, int8")
    parser.add_argument("--tp", type=int, help="tensor-parallel degree")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(handler=run)


def _spec(base: ModelSpec, args: argparse.Namespace) -> ModelSpec:
    spec = preset(args.model) if args.model else base
    updates: dict[str, Any] = {}
    if args.dtype is not None:
        updates["dtype"] = args.dtype
    if args.tp is not None:
        updates["tensor_parallel"] = args.tp
    if not updates:
        return spec
    try:
        return ModelSpec.model_validate({**spec.model_dump(), **updates})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e['input']!r})" for e in exc.errors()
        )
        raise InvalidArgument(f"bad model override: {problems}") from None


def build_plan(args: argparse.Namespace) -> MemoryPlan:
    if not args.config and not args.model:
        raise InvalidArgument("give --config FILE or --model NAME")
    for name in ("context", "sequences", "block_size", "tp"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (value == 0 and name != "sequences")):
            raise InvalidArgument(f"--{name.replace('_', '-')} must be positive, got {value}")
    try:
        memory = parse_byte_size(args.memory) if args.memory is not None else None
    except ValueError as exc:
        raise InvalidArgument(f"--memory: {exc}") from None
    if args.config:
        config = load_config(args.config, apply_env=False)
        spec = _spec(config.model, args)
        cache = config.cache
        if args.block_size is not None:
            try:
                cache = CacheConfig.model_validate(
                    {**cache.model_dump(), "block_size": args.block_size}
                )
            except ValidationError as exc:
                raise InvalidArgument(f"--block-size: {exc.errors()[0]['msg']}") from None
        config = config.model_copy(update={"model": spec, "cache": cache})
        return plan_from_config(
            config, context=args.context, sequences=args.sequences, gpu_bytes=memory
        )
    spec = _spec(preset(args.model), args)
    return plan_for_model(
        spec,
        memory if memory is not None else parse_byte_size(DEFAULT_MEMORY),
        block_size=args.block_size or 16,
        context=args.context or 32768,
        sequences=args.sequences,
    )


def plan_as_dict(plan: MemoryPlan) -> dict[str, Any]:
    def load(check: Any) -> dict[str, Any] | None:
        if check is None:
            return None
        return {
            "sequences": check.sequences, "context": check.context,
            "blocks_needed": check.blocks_needed, "blocks_available": check.blocks_available,
            "bytes_needed": check.bytes_needed, "fits": check.fits,
        }

    return {
        "model": plan.spec.name,
        "dtype": plan.spec.dtype,
        "tensor_parallel": plan.spec.tensor_parallel,
        "block_size": plan.block_size,
        "context": plan.context,
        "bytes_per_token": plan.bytes_per_token,
        "bytes_per_token_all_ranks": plan.bytes_per_token_all_ranks,
        "bytes_per_block": plan.bytes_per_block,
        "blocks_per_sequence": plan.blocks_per_sequence,
        "bytes_per_sequence": plan.bytes_per_sequence,
        "tiers": [
            {"name": t.name, "capacity_bytes": t.capacity_bytes, "blocks": t.blocks,
             "tokens": t.tokens, "sequences": t.sequences, "source": t.source}
            for t in plan.tiers
        ],
        "engine_blocks": plan.engine_blocks,
        "engine_sequences": plan.engine_sequences,
        "load": load(plan.load),
        "load_all_tiers": load(plan.load_all_tiers),
        "notes": list(plan.notes),
    }


def run(args: argparse.Namespace) -> int:
    plan = build_plan(args)
    if args.json:
        print(json.dumps(plan_as_dict(plan), indent=2))
    else:
        print(render(plan))
    return 1 if plan.load is not None and not plan.load.fits else 0
