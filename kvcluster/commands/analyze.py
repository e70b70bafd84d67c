"""``kvcluster analyze``: pre-flight analysis of a prompt workload for the prefix cache.

    kvcluster analyze prompts.jsonl [--cache-sizes 64K,1M,8M] [--policies lru,lfu,reuse]
    kvcluster analyze texts.jsonl --tokenizer meta-llama/Llama-3.1-8B      (offline tokenizer)
    kvcluster analyze trace.jsonl [--expand-tokens] [--model llama-3-8b] [--plot out.png]

Each line of FILE is ``{"tokens": [ids...]}``, ``{"text": "..."}`` (needs ``--tokenizer``, a
Hugging Face tokenizer available offline) or a Mooncake block trace record ``{"hash_ids":
[...], "input_length": N}`` (block ids of 512 tokens; analysed per block, or per token with
``--expand-tokens``). Prints the totals, unique tokens and dedup ratio, the top shared
prefixes, the projected hit rate against cache size for each policy (replayed through the real
prefix index), and the recommended cache size and policy; writes a PNG plot of hit rate
against cache size. Sizes take K/M/G suffixes (powers of 1000 tokens). Exit status 0.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from kvcluster.core.workload_analysis import WorkloadAnalysis, analyze_workload
from kvcluster.core.workload_reader import Workload, read_workload
from kvcluster.errors import InvalidArgument, InvalidWorkload, MissingDependency
from kvcluster.memory_calculator import format_bytes
from kvcluster.model_spec import PRESETS, ModelSpec, preset

#: Inputs at least this many tokens long get a progress bar.
PROGRESS_MIN_TOKENS = 1_000_000
_SUFFIXES = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="pre-flight analysis of a prompt workload: sharing, hit rate vs cache size",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", type=Path, help="JSONL workload (tokens, text or a block trace)")
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer name or path for text prompts (offline)")
    parser.add_argument("--cache-sizes", help="comma-separated cache sizes in tokens, e.g. 256K,1M,4M")
    parser.add_argument("--policies", default="lru,lfu,reuse",
                        help="eviction policies to compare (default lru,lfu,reuse)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    parser.add_argument("--expand-tokens", action="store_true", help="analyse a block trace token by token")
    parser.add_argument("--top", type=int, default=10, help="shared prefixes to list (default 10)")
    parser.add_argument("--target", type=float, default=0.9, help="fraction of the unbounded hit rate to aim for")
    parser.add_argument("--limit", type=int, help="analyse only the first N prompts")
    parser.add_argument("--model", help=f"show cache sizes in bytes for a preset: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--plot", type=Path, help="PNG path (default: FILE's name + .hit-rate.png, here)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    parser.add_argument("--json", type=Path, help="also write the analysis as JSON to this path")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    spec = preset(args.model) if args.model else None
    sizes = parse_sizes(args.cache_sizes) if args.cache_sizes else None
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if args.limit is not None and args.limit <= 0:
        raise InvalidArgument(f"--limit must be positive, got {args.limit}")
    if args.top < 0:
        raise InvalidArgument(f"--top must be >= 0, got {args.top}")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    workload = read_workload(args.file, tokenizer=tokenizer, limit=args.limit)
    if args.expand_tokens:
        workload = workload.expanded()
    console = Console()
    analysis = _analyze(workload, args, sizes, policies)
    plot_path = None
    if not args.no_plot:
        plot_path = args.plot or Path(f"{args.file.name}.hit-rate.png")
        write_plot(analysis, plot_path, title=args.file.name)
    render(console, analysis, spec, plot_path)
    if args.json:
        try:
            args.json.write_text(json.dumps(asdict(analysis), indent=2) + "\n")
        except OSError as exc:
            raise InvalidArgument(
                f"cannot write the analysis to {args.json}: {exc.strerror or exc}"
            ) from None
    return 0


def _analyze(workload: Workload, args: argparse.Namespace, sizes: list[int] | None, policies: list[str]) -> WorkloadAnalysis:
    def analyze(progress: Callable[[int, int], None] | None) -> WorkloadAnalysis:
        return analyze_workload(
            workload, block_size=args.block_size, cache_sizes=sizes, policies=policies,
            top=args.top, target=args.target, progress=progress,
        )

    if workload.total_tokens < PROGRESS_MIN_TOKENS:
        return analyze(None)
    columns = (TextColumn("analysing"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("analysing", total=None)
        return analyze(lambda done, total: bar.update(task, completed=done, total=total))


def parse_sizes(text: str) -> list[int]:
    """``"256K,1M,1.5M"`` -> token counts (K/M/G are powers of 1000)."""
    sizes = []
    for part in text.split(","):
        item = part.strip().upper()
        suffix = item[-1:] if item[-1:] in _SUFFIXES and item[-1:] else ""
        number = item[: -1] if suffix else item
        try:
            value = float(number) * _SUFFIXES[suffix]
        except ValueError:
            raise InvalidArgument(f"bad cache size {part.strip()!r}; use token counts such as 64K, 1M or 500000") from None
        if not math.isfinite(value) or value < 1:
            raise InvalidArgument(f"cache size {part.strip()!r} must be at least one token")
        sizes.append(int(value))
    return sizes


def load_tokenizer(name: str) -> Callable[[str], list[int]]:
    """``text -> token ids`` with a Hugging Face tokenizer that is available offline."""
    try:
        # Imported here: transformers takes seconds to import and is an optional extra.
        from transformers import AutoTokenizer
    except ImportError:
        raise MissingDependency("text prompts need transformers: pip install 'kvcluster[hf]'") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidWorkload(
            f"tokenizer {name!r} is not available offline ({first_line}); download it into the "
            "Hugging Face cache first or pass a local directory"
        ) from None

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    return encode


def render(console: Console, analysis: WorkloadAnalysis, spec: ModelSpec | None, plot_path: Path | None) -> None:
    summary = Table(title="Workload", show_header=False)
    summary.add_column("", style="bold")
    summary.add_column("", justify="right")
    summary.add_row("prompts", f"{analysis.prompts:,}")
    summary.add_row("total tokens", f"{analysis.total_tokens:,}")
    summary.add_row("unique tokens", f"{analysis.unique_tokens:,}")
    summary.add_row("dedup ratio", f"{analysis.dedup_ratio:.2f}x")
    summary.add_row("hit rate, unbounded cache", f"{analysis.infinite_hit_rate:.1%}")
    granularity = "tokens" if analysis.symbol_tokens == 1 else f"blocks of {analysis.symbol_tokens} tokens"
    summary.add_row("replay granularity", f"{granularity}; cache block {analysis.block_size} tokens")
    console.print(summary)

    curve = Table(title="Projected token hit rate by cache size (replayed through the prefix index)")
    curve.add_column("cache tokens", justify="right")
    curve.add_column("blocks", justify="right")
    if spec is not None:
        curve.add_column(f"memory ({spec.name})", justify="right")
    for policy in analysis.policies:
        curve.add_column(policy, justify="right")
    for size in analysis.cache_sizes:
        points = {p.policy: p for p in analysis.curve if p.cache_tokens == size}
        row = [f"{size:,}", f"{next(iter(points.values())).cache_blocks:,}"]
        if spec is not None:
            row.append(format_bytes(size * spec.bytes_per_token))
        best = max(p.hit_rate for p in points.values())
        for policy in analysis.policies:
            rate = points[policy].hit_rate
            row.append(f"[bold]{rate:.1%}[/bold]" if rate == best and len(points) > 1 else f"{rate:.1%}")
        curve.add_row(*row)
    console.print(curve)

    if analysis.top_prefixes:
        shared = Table(title="Top shared prefixes")
        starts = "starts with" if analysis.symbol_tokens == 1 else "starts with (block ids)"
        for column in ("#", "tokens", "prompts", "tokens saved", starts):
            shared.add_column(column, justify="left" if column == starts else "right")
        for rank, prefix in enumerate(analysis.top_prefixes, start=1):
            preview = " ".join(str(t) for t in prefix.preview[:8]) + (" ..." if len(prefix.preview) > 8 else "")
            shared.add_row(str(rank), f"{prefix.tokens:,}", f"{prefix.prompts:,}", f"{prefix.saved_tokens:,}", preview)
        console.print(shared)

    goal = analysis.target * analysis.infinite_hit_rate
    if analysis.recommended_cache_tokens is not None:
        size = analysis.recommended_cache_tokens
        memory = f" ({format_bytes(size * spec.bytes_per_token)} for {spec.name})" if spec is not None else ""
        rate = analysis.hit_rate(size, analysis.recommended_policy)
        console.print(
            f"Recommended: a cache of {size:,} tokens{memory} with [bold]{analysis.recommended_policy}[/bold]: "
            f"{rate:.1%} of prompt tokens from cache, the smallest evaluated size reaching "
            f"{analysis.target:.0%} of the {analysis.infinite_hit_rate:.1%} an unbounded cache reaches."
        )
    else:
        console.print(
            f"No evaluated size reaches {goal:.1%} ({analysis.target:.0%} of the unbounded "
            f"{analysis.infinite_hit_rate:.1%}); try larger --cache-sizes. Best policy at the "
            f"largest size: [bold]{analysis.recommended_policy}[/bold]."
        )
    if plot_path is not None:
        console.print(f"Plot: {plot_path}")


def write_plot(analysis: WorkloadAnalysis, path: Path, title: str = "") -> None:
    """Hit rate against cache size (log scale), one line per policy, to a PNG at ``path``."""
    # The object API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for policy in analysis.policies:
        points = sorted((p for p in analysis.curve if p.policy == policy), key=lambda p: p.cache_tokens)
        axes.plot([p.cache_tokens for p in points], [100 * p.hit_rate for p in points], marker="o", label=policy)
    axes.axhline(100 * analysis.infinite_hit_rate, linestyle="--", color="grey", label="unbounded cache")
    if analysis.recommended_cache_tokens is not None:
        axes.axvline(analysis.recommended_cache_tokens, linestyle=":", color="black", label="recommended")
    if analysis.curve:
        axes.set_xscale("log")
    axes.set_xlabel("cache size (tokens)")
    axes.set_ylabel("prompt tokens served from cache (%)")
    axes.set_ylim(0, 100)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title(f"Prefix-cache hit rate vs cache size: {title}" if title else "Prefix-cache hit rate vs cache size")
    figure.tight_layout()
    try:
        figure.savefig(path, format="png")
    except OSError as exc:
        raise InvalidArgument(f"cannot write the plot to {path}: {exc.strerror or exc}") from None
