"""Pre-flight analysis of a JSONL workload: how much would a prefix cache share, at what size?

    python examples/analyze_workload.py [FILE] [--plot hit_rate.png]

FILE defaults to the Mooncake trace sample in tests/data (a block trace: 512-token block ids);
a file of {"tokens": [...]} lines works the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvcluster.commands.analyze import write_plot
from kvcluster.core.workload_analysis import analyze_workload
from kvcluster.core.workload_reader import read_workload

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "mooncake_sample.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file", nargs="?", default=str(SAMPLE))
    parser.add_argument("--plot", default="hit_rate.png", help="where to write the PNG plot")
    args = parser.parse_args(argv)

    workload = read_workload(args.file)
    analysis = analyze_workload(workload, policies=("lru", "lfu"))
    print(f"{analysis.prompts} prompts, {analysis.total_tokens:,} tokens, "
          f"{analysis.unique_tokens:,} unique (dedup ratio {analysis.dedup_ratio:.2f}); "
          f"an unbounded cache serves {analysis.infinite_hit_rate:.1%} of prompt tokens")
    for size in analysis.cache_sizes:
        rates = "  ".join(f"{p} {analysis.hit_rate(size, p):6.1%}" for p in analysis.policies)
        print(f"  cache of {size:>12,} tokens: {rates}")
    for prefix in analysis.top_prefixes[:3]:
        print(f"  shared prefix of {prefix.tokens:,} tokens by {prefix.prompts} prompts "
              f"saves {prefix.saved_tokens:,} tokens")
    print(f"recommended: {analysis.recommended_cache_tokens} tokens with {analysis.recommended_policy}")
    write_plot(analysis, Path(args.plot), title=Path(args.file).name)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
