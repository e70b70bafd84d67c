"""The one table every ``benchmarks/bench_*.py`` prints: figure, value, same-run baseline,
target, met. Rows are the dicts each module's ``run()`` returns (see ``benchmarks.run_all``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def format_value(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def print_table(rows: Sequence[Mapping[str, Any]]) -> None:
    table = [("figure", "value", "baseline (same run)", "target", "met")]
    for row in rows:
        unit = str(row.get("unit", ""))
        baseline = ""
        if row.get("baseline") is not None:
            value = row.get("baseline_value")
            prefix = f"{format_value(value, unit)}  " if value is not None else ""
            baseline = f"{prefix}{row['baseline']}"
        met = row.get("met")
        table.append((
            str(row["name"]), format_value(row["value"], unit), baseline,
            str(row.get("target", "") or ""), "-" if met is None else ("yes" if met else "NO"),
        ))
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    for index, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if index == 0:
            print("  ".join("-" * w for w in widths))
