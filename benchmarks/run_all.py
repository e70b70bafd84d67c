"""Run every benchmark of the project and write one report: ``make bench``.

    .venv/bin/python -m benchmarks.run_all [--quick] [--only NAME ...] [--out DIR]

Every ``benchmarks/bench_*.py`` module is discovered and its ``run(quick: bool) ->
list[dict]`` called. Each row is a dict with the keys ``name`` and ``value`` (required) and
``unit``, ``baseline``, ``baseline_value``, ``target`` and ``met`` (optional: a missing one is
shown as "-"). The report goes to ``DIR/results.md`` (a table per benchmark: figure, value,
same-run baseline, target, met or not) and ``DIR/results.json`` (the same data), headed by a
description of the machine: CPU model and count, memory, library versions, CUDA device, date
and git commit.

Failures are isolated: by default each benchmark runs in its own Python process, so an
exception, a crash (segfault, OOM kill), a hang past ``--timeout`` or state a benchmark leaves
behind (a Ray session, torch's thread count) cannot take the others down. A failed benchmark
appears in the report with its error and the tail of its traceback; the others still run.
The exit status is 1 when any benchmark failed, else 0 (a target that is not met is a
result, not a failure).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as dt
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PACKAGE = BENCH_DIR.name
REPO_ROOT = BENCH_DIR.parent

#: Distributions whose versions head the report (None when one is not installed).
REPORTED_PACKAGES = ("torch", "numpy", "ray", "redis", "hiredis", "transformers", "pydantic")
REQUIRED_ROW_KEYS = ("name", "value")
OPTIONAL_ROW_KEYS = ("unit", "baseline", "baseline_value", "target", "met")
#: Lines of a failed benchmark's traceback kept in the report.
TRACEBACK_TAIL_LINES = 15
DEFAULT_TIMEOUT_S = 1800.0

RowValue = float | int | str | bool | None
RunFn = Callable[[bool], Sequence[Mapping[str, Any]]]


class BenchmarkFailed(Exception):
    """A benchmark that raised, crashed or returned rows that are not a list of row dicts.

    ``details`` holds the traceback (or the child process's output tail) for the report.
    """

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


# --- rows ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One figure of a benchmark, normalised: optional keys that were missing are None."""

    name: str
    value: RowValue
    unit: str | None = None
    baseline: str | None = None
    baseline_value: RowValue = None
    target: str | None = None
    met: bool | None = None

    def as_dict(self) -> dict[str, RowValue]:
        return {
            "name": self.name, "value": self.value, "unit": self.unit,
            "baseline": self.baseline, "baseline_value": self.baseline_value,
            "target": self.target, "met": self.met,
        }


def _plain_value(value: Any, key: str) -> RowValue:
    """A JSON-safe scalar from a row value (numpy and torch scalars become Python numbers).

    Non-finite floats (NaN, inf) become None: JSON has no spelling for them.
    """
    # Subclasses (numpy.float64 is a float) are converted to the plain type.
    if value is None:
        return None
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    item = getattr(value, "item", None)  # numpy / torch scalars and 0-d arrays
    if callable(item):
        try:
            return _plain_value(item(), key)
        except (TypeError, ValueError):
            pass
    raise BenchmarkFailed(f"{key} must be a number, string, bool or None, got {value!r}")


def normalise_row(raw: Any, index: int) -> ReportRow:
    """Validate one row; ``index`` names it in the error. Missing optional keys become None."""
    if not isinstance(raw, Mapping):
        raise BenchmarkFailed(f"row {index} is a {type(raw).__name__}, not a dict")
    missing = [key for key in REQUIRED_ROW_KEYS if key not in raw]
    if missing:
        raise BenchmarkFailed(f"row {index} ({dict(raw)!r}) lacks {', '.join(missing)}")
    met = raw.get("met")
    plain_met = _plain_value(met, f"row {index} met")
    if plain_met is not None and not isinstance(plain_met, bool):
        raise BenchmarkFailed(f"row {index} met must be true, false or None, got {met!r}")

    def text(key: str) -> str | None:
        value = raw.get(key)
        return None if value is None else str(value)

    return ReportRow(
        name=str(raw["name"]),
        value=_plain_value(raw["value"], f"row {index} value"),
        unit=text("unit"),
        baseline=text("baseline"),
        baseline_value=_plain_value(raw.get("baseline_value"), f"row {index} baseline_value"),
        target=text("target"),
        met=plain_met,
    )


def normalise_rows(raw: Any) -> tuple[ReportRow, ...]:
    if isinstance(raw, Mapping | str | bytes) or not isinstance(raw, Sequence):
        raise BenchmarkFailed(f"run() must return a list of row dicts, got {type(raw).__name__}")
    return tuple(normalise_row(row, i) for i, row in enumerate(raw))


# --- benchmarks and their outcomes -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Benchmark:
    """A benchmark to run: ``run(quick)`` returns its rows or raises."""

    name: str
    run: RunFn
    title: str = ""


@dataclass(frozen=True, slots=True)
class BenchmarkOutcome:
    """What running one benchmark gave: its rows, or the error that stopped it (rows empty)."""

    name: str
    title: str
    seconds: float
    rows: tuple[ReportRow, ...] = ()
    error: str | None = None
    details: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def targets(self) -> tuple[int, int]:
        """(met, with a verdict): rows whose ``met`` is True, and rows whose ``met`` is not None."""
        judged = [row.met for row in self.rows if row.met is not None]
        return sum(1 for met in judged if met), len(judged)

    def as_dict(self) -> dict[str, Any]:
        met, judged = self.targets
        return {
            "name": self.name, "title": self.title, "status": "ok" if self.ok else "failed",
            "seconds": round(self.seconds, 3), "error": self.error, "details": self.details,
            "targets_met": met, "targets_judged": judged,
            "rows": [row.as_dict() for row in self.rows],
        }


def run_benchmark(
    benchmark: Benchmark, quick: bool, clock: Callable[[], float] = time.perf_counter
) -> BenchmarkOutcome:
    """Run one benchmark; any exception it raises becomes a failed outcome, never propagates."""
    start = clock()
    try:
        rows = normalise_rows(benchmark.run(quick))
    except BenchmarkFailed as exc:
        return BenchmarkOutcome(
            benchmark.name, benchmark.title, clock() - start, error=str(exc),
            details=exc.details or _traceback_tail(exc),
        )
    except Exception as exc:  # isolation is this function's job: report, then go on
        return BenchmarkOutcome(
            benchmark.name, benchmark.title, clock() - start,
            error=f"{type(exc).__name__}: {exc}", details=_traceback_tail(exc),
        )
    return BenchmarkOutcome(benchmark.name, benchmark.title, clock() - start, rows=rows)


def run_benchmarks(
    benchmarks: Sequence[Benchmark],
    quick: bool,
    clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[str], None] | None = None,
) -> list[BenchmarkOutcome]:
    """Run ``benchmarks`` in order; one failing does not stop the rest."""
    outcomes = []
    for benchmark in benchmarks:
        if progress:
            progress(f"running {benchmark.name} ...")
        outcome = run_benchmark(benchmark, quick, clock)
        if progress:
            verdict = f"{len(outcome.rows)} figures" if outcome.ok else f"FAILED: {outcome.error}"
            progress(f"  {benchmark.name}: {verdict} in {outcome.seconds:.1f} s")
        outcomes.append(outcome)
    return outcomes


def _traceback_tail(exc: BaseException) -> str:
    lines = "".join(traceback.format_exception(exc)).rstrip().splitlines()
    return "\n".join(lines[-TRACEBACK_TAIL_LINES:])


# --- discovery -------------------------------------------------------------------------------


def discover(directory: Path = BENCH_DIR) -> list[str]:
    """Stems of the ``bench_*.py`` modules in ``directory``, sorted."""
    return sorted(path.stem for path in directory.glob("bench_*.py") if path.is_file())


def module_title(path: Path) -> str:
    """First line of a module's docstring, read without importing it ("" when there is none)."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return ""
    return doc.strip().splitlines()[0].strip() if doc else ""


def select(stems: Sequence[str], only: Sequence[str] | None) -> list[str]:
    """The stems ``only`` names (``bench_engine`` or ``engine``), in discovery order.

    Raises ``ValueError`` naming every unknown name and the known ones.
    """
    if not only:
        return list(stems)
    wanted = {name if name.startswith("bench_") else f"bench_{name}" for name in only}
    wanted = {name.removesuffix(".py") for name in wanted}
    unknown = sorted(wanted - set(stems))
    if unknown:
        raise ValueError(
            f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(stems) or 'none'}"
        )
    return [stem for stem in stems if stem in wanted]


def in_process(stem: str, package: str = PACKAGE) -> RunFn:
    """A run function importing ``package.stem`` in this process and calling its ``run``."""

    def run(quick: bool) -> Sequence[Mapping[str, Any]]:
        module = importlib.import_module(f"{package}.{stem}")
        result: Sequence[Mapping[str, Any]] = module.run(quick=quick)
        return result

    return run


def in_subprocess(
    stem: str,
    timeout_s: float,
    *,
    package: str = PACKAGE,
    search_path: Sequence[Path] = (),
    python: str = sys.executable,
) -> RunFn:
    """A run function running ``package.stem`` in a child Python and reading its rows back.

    The child is ``python -m benchmarks.run_all --child package.stem`` started in the
    repository root, with ``search_path`` put in front of ``PYTHONPATH`` (where ``package``
    lives when it is not beside ``benchmarks``). It runs in its own process group: on a
    timeout or an interrupt the whole group (Ray workers included) is killed. The child's
    output goes to this process's stderr, live.
    """

    def run(quick: bool) -> Sequence[Mapping[str, Any]]:
        env = dict(os.environ)
        # Ray 2.60 turns token auth on by default; a local benchmark cluster needs none.
        env.setdefault("RAY_AUTH_MODE", "disabled")
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if search_path:
            paths = [str(p) for p in search_path]
            if env.get("PYTHONPATH"):
                paths.append(env["PYTHONPATH"])
            env["PYTHONPATH"] = os.pathsep.join(paths)
        with tempfile.TemporaryDirectory(prefix="kvc-bench-") as tmp:
            out = Path(tmp) / "rows.json"
            command = [python, "-m", f"{PACKAGE}.run_all", "--child", f"{package}.{stem}",
                       "--rows-out", str(out)]
            if quick:
                command.append("--quick")
            returncode = _run_group(command, env, timeout_s)
            if out.exists():
                payload = json.loads(out.read_text(encoding="utf-8"))
                if "error" in payload:
                    raise BenchmarkFailed(payload["error"], payload.get("details", ""))
                rows: list[Mapping[str, Any]] = payload["rows"]
                return rows
            raise BenchmarkFailed(
                f"the benchmark process {_exit_reason(returncode)} before returning its rows"
            )

    return run


def _run_group(command: list[str], env: Mapping[str, str], timeout_s: float) -> int:
    """Run ``command`` in a new process group; kill the group on timeout or interrupt."""
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=dict(env), stdout=sys.stderr, stderr=sys.stderr,
        start_new_session=True,
    )
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        raise BenchmarkFailed(f"timed out after {timeout_s:g} s") from None
    except BaseException:
        _kill_group(process)
        raise


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _child(module_name: str, quick: bool, rows_out: Path) -> int:
    """Body of a child process: run one module, write ``{"rows": ...}`` or ``{"error": ...}``."""
    try:
        module = importlib.import_module(module_name)
        rows = [row.as_dict() for row in normalise_rows(module.run(quick=quick))]
        payload: dict[str, Any] = {"rows": rows}
    except BenchmarkFailed as exc:
        payload = {"error": str(exc), "details": exc.details or _traceback_tail(exc)}
    except Exception as exc:  # reported to the parent, which isolates it
        payload = {"error": f"{type(exc).__name__}: {exc}", "details": _traceback_tail(exc)}
    rows_out.write_text(json.dumps(payload, allow_nan=False), encoding="utf-8")
    return 0 if "rows" in payload else 1


def discovered_benchmarks(
    only: Sequence[str] | None, *, isolate: bool, timeout_s: float, directory: Path = BENCH_DIR
) -> list[Benchmark]:
    stems = select(discover(directory), only)
    return [
        Benchmark(
            stem,
            in_subprocess(stem, timeout_s) if isolate else in_process(stem),
            module_title(directory / f"{stem}.py"),
        )
        for stem in stems
    ]


# --- the machine -----------------------------------------------------------------------------


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The first ``model name`` (x86) or ``Model``/``Hardware`` (ARM) line of ``cpuinfo``."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or None
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in text.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or None


def memory_total_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        text = meminfo.read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                scale = 1024 if len(parts) < 3 or parts[2].lower() == "kb" else 1
                return int(parts[1]) * scale
    return None


def package_versions(names: Sequence[str] = REPORTED_PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cuda_devices() -> list[str]:
    """Names of the visible CUDA devices; empty without torch or without CUDA."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def git_commit(repo: Path = REPO_ROOT) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of ``repo``'s HEAD, or None outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()
        # The results files are this command's own output: a rerun over an earlier run's
        # results is still a run of HEAD.
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":(exclude)benchmarks/results.md", ":(exclude)benchmarks/results.json"],
            cwd=repo, capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(status.strip())}


@dataclass(frozen=True, slots=True)
class MachineProbes:
    """Where the machine's description comes from; tests inject fakes."""

    now: Callable[[], dt.datetime] = field(default=lambda: dt.datetime.now(dt.timezone.utc))
    cpuinfo: Path = Path("/proc/cpuinfo")
    meminfo: Path = Path("/proc/meminfo")
    cpu_count: Callable[[], int | None] = os.cpu_count
    usable_cpus: Callable[[], int | None] = field(
        default=lambda: len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    )
    cuda: Callable[[], list[str]] = cuda_devices
    git: Callable[[], dict[str, Any] | None] = git_commit
    versions: Callable[[], dict[str, str | None]] = package_versions


def describe_machine(probes: MachineProbes | None = None) -> dict[str, Any]:
    """Everything the report says about where it was measured."""
    probes = probes or MachineProbes()
    return {
        "date": probes.now().isoformat(timespec="seconds"),
        "cpu_model": cpu_model(probes.cpuinfo),
        "cpu_count": probes.cpu_count(),
        "usable_cpus": probes.usable_cpus(),
        "memory_total_bytes": memory_total_bytes(probes.meminfo),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": probes.versions(),
        "cuda_devices": probes.cuda(),
        "git": probes.git(),
    }


# --- rendering -------------------------------------------------------------------------------


def format_number(value: RowValue, unit: str | None = None) -> str:
    """A value with its unit: thousands separators, about 3-4 significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, float):
        magnitude = abs(value)
        if magnitude >= 1000:
            text = f"{value:,.0f}"
        elif magnitude >= 100:
            text = f"{value:.1f}"
        elif magnitude >= 1 or magnitude == 0:
            text = f"{value:.2f}"
        else:
            text = f"{value:.3g}"
    else:
        text = str(value)
    return f"{text} {unit}" if unit else text


def _cell(text: object) -> str:
    """Markdown table cell text: one line, pipes escaped."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").strip() or "-"


#: A target that is a comparison with a bare number ("<= 100"): the row's unit is appended.
_BARE_BOUND = re.compile(r"^\s*(<=|>=|<|>|=|≤|≥)\s*[0-9][0-9,.]*\s*$")


def _verdict(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "**not met**")


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def render_machine(machine: Mapping[str, Any]) -> list[str]:
    packages = machine.get("packages") or {}
    versions = ", ".join(f"{name} {version or 'not installed'}" for name, version in packages.items())
    cpus = machine.get("cpu_count")
    usable = machine.get("usable_cpus")
    cpu_text = f"{machine.get('cpu_model') or 'unknown CPU'}, {cpus or '?'} logical CPUs"
    if usable is not None and usable != cpus:
        cpu_text += f" ({usable} usable by this process)"
    cuda = machine.get("cuda_devices") or []
    git = machine.get("git")
    git_text = "not a git checkout" if not git else (
        f"`{git['commit'][:12]}`" + (" with uncommitted changes" if git.get("dirty") else "")
    )
    rows = [
        ("Date", machine.get("date")),
        ("CPU", cpu_text),
        ("Memory", _gib(machine.get("memory_total_bytes"))),
        ("CUDA", ", ".join(cuda) if cuda else "none"),
        ("OS", machine.get("os")),
        ("Python", machine.get("python")),
        ("Packages", versions or "-"),
        ("Git commit", git_text),
    ]
    return ["| | |", "|---|---|", *(f"| {key} | {_cell(value)} |" for key, value in rows)]


def render_markdown(
    machine: Mapping[str, Any], outcomes: Sequence[BenchmarkOutcome], command: str
) -> str:
    """The report as markdown: machine, summary, then one table per benchmark."""
    lines = [
        "# kvcluster benchmark results",
        "",
        f"Generated by `{command}`. Run `make bench` to reproduce (add `--quick` for a short "
        "run). Every figure stands next to a baseline measured in the same run and its target; "
        "\"-\" means the figure has no target.",
        "",
        "## Machine",
        "",
        *render_machine(machine),
        "",
        "## Summary",
        "",
        "| benchmark | status | figures | targets met | time |",
        "|---|---|---:|---:|---:|",
    ]
    for outcome in outcomes:
        met, judged = outcome.targets
        status = "ok" if outcome.ok else f"**FAILED**: {outcome.error}"
        lines.append(
            f"| [{outcome.name}](#{outcome.name}) | {_cell(status)} | {len(outcome.rows)} | "
            f"{f'{met}/{judged}' if judged else '-'} | {outcome.seconds:.1f} s |"
        )
    for outcome in outcomes:
        lines += ["", f"## {outcome.name}", ""]
        if outcome.title:
            lines += [outcome.title, ""]
        if not outcome.ok:
            lines += [f"**FAILED**: {_cell(outcome.error)}", ""]
            if outcome.details:
                lines += ["```text", outcome.details.rstrip(), "```"]
            continue
        if not outcome.rows:
            lines.append("(no figures)")
            continue
        lines += [
            "| figure | value | baseline (same run) | target | met |",
            "|---|---:|---|---|---|",
        ]
        for row in outcome.rows:
            baseline = "-"
            if row.baseline is not None or row.baseline_value is not None:
                value_text = (
                    format_number(row.baseline_value, row.unit)
                    if row.baseline_value is not None else ""
                )
                baseline = " ".join(
                    part for part in (value_text, f"({row.baseline})" if row.baseline else "")
                    if part
                )
            target = row.target if row.target not in (None, "", "-") else "-"
            if row.unit and _BARE_BOUND.match(target):
                target = f"{target} {row.unit}"
            lines.append(
                f"| {_cell(row.name)} | {_cell(format_number(row.value, row.unit))} | "
                f"{_cell(baseline)} | {_cell(target)} | {_verdict(row.met)} |"
            )
    return "\n".join(lines) + "\n"


def render_json(
    machine: Mapping[str, Any], outcomes: Sequence[BenchmarkOutcome], command: str, quick: bool
) -> str:
    payload = {
        "schema_version": 1,
        "command": command,
        "quick": quick,
        "machine": dict(machine),
        "benchmarks": [outcome.as_dict() for outcome in outcomes],
    }
    return json.dumps(payload, indent=2, allow_nan=False) + "\n"


def write_report(
    out_dir: Path,
    machine: Mapping[str, Any],
    outcomes: Sequence[BenchmarkOutcome],
    command: str,
    quick: bool,
) -> tuple[Path, Path]:
    """Write ``results.md`` and ``results.json`` into ``out_dir``; return their paths.

    Each file is written to a temporary name and renamed, so a reader never sees half a report.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (
        ("results.md", render_markdown(machine, outcomes, command)),
        ("results.json", render_json(machine, outcomes, command, quick)),
    ):
        path = out_dir / name
        partial = out_dir / f".{name}.partial"
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
        written.append(path)
    return written[0], written[1]


def run_and_report(
    benchmarks: Sequence[Benchmark],
    out_dir: Path,
    *,
    quick: bool,
    command: str,
    probes: MachineProbes | None = None,
    clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[str], None] | None = None,
) -> list[BenchmarkOutcome]:
    """Describe the machine, run ``benchmarks`` (failures isolated) and write the report."""
    machine = describe_machine(probes)
    outcomes = run_benchmarks(benchmarks, quick, clock, progress)
    write_report(out_dir, machine, outcomes, command, quick)
    return outcomes


# --- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run_all", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="each benchmark's short variant")
    parser.add_argument(
        "--only", action="append", metavar="NAME",
        help="run only this benchmark (bench_engine or engine); repeatable",
    )
    parser.add_argument(
        "--out", type=Path, default=BENCH_DIR, metavar="DIR",
        help="where results.md and results.json go (default: benchmarks/)",
    )
    parser.add_argument(
        "--in-process", action="store_true",
        help="run the benchmarks in this process (faster start; a crash stops the run)",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
        help="seconds one benchmark may take before it is stopped and reported failed",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--child", metavar="MODULE", help=argparse.SUPPRESS)
    parser.add_argument("--rows-out", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        if args.rows_out is None:
            parser.error("--child needs --rows-out")
        return _child(args.child, args.quick, args.rows_out)
    if args.list:
        for stem in discover():
            print(f"{stem}  {module_title(BENCH_DIR / f'{stem}.py')}")
        return 0
    try:
        benchmarks = discovered_benchmarks(
            args.only, isolate=not args.in_process, timeout_s=args.timeout
        )
    except ValueError as exc:
        parser.error(str(exc))
    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m benchmarks.run_all", *given])
    outcomes = run_and_report(
        benchmarks, args.out, quick=args.quick, command=command,
        progress=lambda line: print(line, flush=True),
    )
    failed = [outcome.name for outcome in outcomes if not outcome.ok]
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
