"""geste side by side with DBOS Transact and Edda: the same scenarios, the same local PostgreSQL (and SQLite).

    .venv/bin/python benchmarks/compare.py               # 5 runs of everything (about an hour on 2 cores)
    .venv/bin/python benchmarks/compare.py --quick       # small sizes, 1 run: a smoke check (a few minutes)
    .venv/bin/python benchmarks/compare.py --runs 7 --systems geste,dbos --scenarios throughput,wakeup

It creates ``benchmarks/.peers-venv`` (once; again when the pins change) with the peers pinned
(``PEERS`` below) and matplotlib, which draws the chart. Each measurement is one fresh subprocess
(``benchmarks/peers/<system>_scenarios.py``, geste's in this venv, the peers' in theirs) on a fresh
PostgreSQL database (``geste_bench_<random>``, dropped afterwards) or SQLite file; the systems alternate
run by run (geste, dbos, dbos-threads, edda, geste, ...). Prints medians over the runs and the ratio
geste/peer, writes ``benchmarks/results/compare.json`` and ``benchmarks/results/compare.png``.
How each number is measured: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEERS_DIR = HERE / "peers"
sys.path.insert(0, str(PEERS_DIR))

import common  # noqa: E402  (benchmarks/peers/common.py: standard library and asyncpg only)

PEERS_VENV = HERE / ".peers-venv"
PEERS = ["dbos==3.4.0", "edda-framework[postgresql,postgres-notify]==0.16.2", "matplotlib"]
RESULTS = HERE / "results"
SERVER = os.environ.get("GESTE_BENCH_POSTGRES_SERVER", "postgresql://postgres@127.0.0.1:5432")


@dataclass(frozen=True)
class Entrant:
    name: str  # as shown
    system: str  # geste, dbos, edda: which script
    variant: str = ""


GESTE, DBOS, DBOS_THREADS, EDDA = (
    Entrant("geste", "geste"),
    Entrant("dbos", "dbos"),
    Entrant("dbos-threads", "dbos", "threads"),
    Entrant("edda", "edda"),
)


@dataclass(frozen=True)
class Metric:
    key: str  # in the RESULT line
    label: str
    unit: str
    higher_is_better: bool


@dataclass
class Case:
    """One scenario at one size on one backend, measured for each entrant."""

    key: str
    title: str
    scenario: str
    backend: str
    entrants: list[Entrant]
    metrics: list[Metric]
    options: dict[str, Any] = field(default_factory=dict)
    count_transactions: bool = False
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Options of one entrant only (by name), with the reason in the README."""
    timeout: float | None = None
    """Seconds one measurement of this case may take (at most ``--timeout``): a peer that hangs costs
    minutes, not the half hour a throughput run may need."""

    def options_of(self, entrant: Entrant) -> dict[str, Any]:
        return {**self.options, **self.overrides.get(entrant.name, {})}


WPS = Metric("workflows_per_s", "workflows/s", "/s", True)
CPU = Metric("cpu_ms_per_workflow", "client CPU per workflow", "ms", False)
WINDOW_CPU = Metric("cpu_ms_per_workflow_window", "CPU per workflow, workers + client", "ms", False)
TX = Metric("transactions_per_workflow", "transactions per workflow", "", False)
P50 = Metric("p50_ms", "p50", "ms", False)
P99 = Metric("p99_ms", "p99", "ms", False)
RSS = Metric("rss_mib", "worker RSS", "MiB", False)
IDLE_TX = Metric("transactions_per_min", "transactions/min idle", "", False)
RESUME = Metric("from_start_ms", "restart to resumed", "ms", False)
AFTER_EVENT = Metric("from_event_ms", "event to resumed", "ms", False)


class Progress:
    """One line per measurement on stderr; on a terminal, also a rich progress bar with the time left."""

    def __init__(self, total: int) -> None:
        self._bar: Any = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task("measuring", total=total)
            self._bar.start()

    def measuring(self, what: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=what)

    def done(self, line: str) -> None:
        if self._bar is None:
            print(line, file=sys.stderr)
        else:
            self._bar.console.print(line, highlight=False, markup=False)
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def cases(args: argparse.Namespace) -> list[Case]:
    quick = args.quick
    n = 100 if quick else 1000
    workers = 2 if quick else 4
    everyone = [GESTE, DBOS, EDDA]
    out = [
        Case(
            "throughput_pg",
            f"3-step workflows, {n}, one process, PostgreSQL",
            "throughput",
            "postgres",
            [GESTE, DBOS, DBOS_THREADS, EDDA],
            [WPS, TX, CPU],
            {"instances": n},
            count_transactions=True,
        ),
        Case(
            "throughput_workers_pg",
            f"3-step workflows, {n}, {workers} worker processes + a client, PostgreSQL",
            "throughput_workers",
            "postgres",
            [GESTE, DBOS, EDDA],
            [WPS, WINDOW_CPU],
            {"instances": n, "workers": workers},
        ),
        Case(
            "throughput_sqlite",
            f"3-step workflows, {n}, one process, SQLite",
            "throughput",
            "sqlite",
            [GESTE, DBOS, DBOS_THREADS, EDDA],
            [WPS, CPU],
            {"instances": n},
            overrides={"edda": {"concurrency": 1}},  # more at once: "database is locked" errors
        ),
        Case(
            "wakeup_pg",
            "wake-up across processes (sender's commit to code running), PostgreSQL",
            "wakeup",
            "postgres",
            everyone,
            [P50, P99],
            {"samples": 10 if quick else 100, "wake-budget": 30 if quick else 90},
        ),
        Case(
            "sleep_pg",
            f"durable sleep 100 ms, {20 if quick else 100} concurrent: lateness, PostgreSQL",
            "sleep",
            "postgres",
            everyone,
            [P50, P99],
            {"sleepers": 20 if quick else 100, "sleep": 0.1},
            timeout=300,
        ),
        Case(
            "sleep_sqlite",
            f"durable sleep 100 ms, {20 if quick else 100} concurrent: lateness, SQLite",
            "sleep",
            "sqlite",
            everyone,
            [P50, P99],
            {"sleepers": 20 if quick else 100, "sleep": 0.1},
            overrides={"edda": {"concurrency": 1}},  # more at once: "database is locked" errors
            timeout=300,  # once, Edda's leader lease lapsed here and a sleeper never fired
        ),
        Case(
            "idle_pg",
            f"{200 if quick else 10_000} waiting workflows, idle {5 if quick else 30} s, PostgreSQL",
            "idle",
            "postgres",
            everyone,
            [RSS, IDLE_TX],
            {
                "waiting": 200 if quick else 10_000,
                "idle-seconds": 5 if quick else 30,
                "settle": 2 if quick else 12,
            },
        ),
    ]
    for steps in (5, 50) if quick else (10, 100, 1000):
        out.append(
            Case(
                f"replay_{steps}_pg",
                f"resume after a restart, {steps} recorded steps, PostgreSQL",
                "replay",
                "postgres",
                everyone,
                [RESUME, AFTER_EVENT],
                {"steps": steps},
            )
        )
    systems = set(args.systems.split(","))
    scenarios = set(args.scenarios.split(",")) if args.scenarios else None
    chosen = []
    for case in out:
        if scenarios is not None and case.scenario not in scenarios and case.key not in scenarios:
            continue
        case.entrants = [e for e in case.entrants if e.system in systems]
        if case.entrants:
            chosen.append(case)
    return chosen


# -- the peers' virtual environment ----------------------------------------------------------------------
def peers_python() -> Path:
    return PEERS_VENV / "bin" / "python"


def ensure_peers_venv() -> None:
    stamp = PEERS_VENV / ".pins"
    wanted = "\n".join(PEERS)
    if stamp.exists() and stamp.read_text() == wanted and peers_python().exists():
        return
    print(f"creating {PEERS_VENV.relative_to(HERE.parent)} with {', '.join(PEERS)} ...", file=sys.stderr)
    if PEERS_VENV.exists():
        shutil.rmtree(PEERS_VENV)
    base = shutil.which("python3") or sys.executable
    subprocess.run([base, "-m", "venv", str(PEERS_VENV)], check=True)
    pip = [str(peers_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *PEERS], check=True)
    stamp.write_text(wanted)


def python_of(entrant: Entrant) -> str:
    return sys.executable if entrant.system == "geste" else str(peers_python())


# -- one measurement ---------------------------------------------------------------------------------------
async def admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(f"{SERVER}/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def run_script(
    entrant: Entrant, scenario: str, db: str, options: dict[str, Any], timeout: float
) -> dict[str, Any]:
    command = [python_of(entrant), str(PEERS_DIR / f"{entrant.system}_scenarios.py"), scenario, "--db", db]
    if entrant.variant:
        command += ["--variant", entrant.variant]
    for name, value in options.items():
        command += [f"--{name}", str(value)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
    raise RuntimeError(f"{entrant.name} {scenario}: exit {proc.returncode}, no result:\n{tail}")


async def measure(case: Case, entrant: Entrant, folder: Path, timeout: float) -> dict[str, Any]:
    options = case.options_of(entrant)
    if case.backend == "sqlite":
        db = f"sqlite:///{folder / f'{entrant.name}-{uuid.uuid4().hex[:8]}.db'}"
        return await asyncio.to_thread(run_script, entrant, case.scenario, db, options, timeout)
    name = f"geste_bench_{uuid.uuid4().hex[:10]}"
    db = f"{SERVER}/{name}"
    await admin(f'CREATE DATABASE "{name}"')
    try:
        if not case.count_transactions:
            return await asyncio.to_thread(run_script, entrant, case.scenario, db, options, timeout)
        await asyncio.to_thread(run_script, entrant, "setup", db, {}, timeout)  # migrations, not counted
        async with common.CountedTransactions(db) as counted:
            out = await asyncio.to_thread(run_script, entrant, case.scenario, db, options, timeout)
            await counted.finish()
        if "na" not in out:
            out["transactions_per_workflow"] = counted.net / case.options["instances"]
            out["transactions_raw_per_workflow"] = counted.total / case.options["instances"]
        return out
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the machine -------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    def meminfo() -> str:
        with open("/proc/meminfo") as f:
            return f.readline().split(":", 1)[1].strip()

    def versions(python: str, names: list[str]) -> dict[str, str]:
        code = (
            "import importlib.metadata as m, json, sys\n"
            f"v = {{n: m.version(n) for n in {names!r}}}\n"
            "print(json.dumps({'python': sys.version.split()[0], **v}))"
        )
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
        return dict(json.loads(out))

    async def server_version() -> str:
        import asyncpg

        conn = await asyncpg.connect(f"{SERVER}/postgres")
        try:
            return str(await conn.fetchval("SELECT version()"))
        finally:
            await conn.close()

    def commit() -> str:
        git = ["git", "-C", str(HERE.parent)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True)
        return head.strip() + (" + uncommitted changes in src/" if dirty.stdout.strip() else "")

    info: dict[str, Any] = {
        "geste_commit": commit(),
        "cpus": os.cpu_count(),
        "memory": meminfo(),
        "platform": platform.platform(),
        "postgresql": asyncio.run(server_version()),
        "geste_venv": versions(sys.executable, ["geste", "asyncpg", "pydantic"]),
        "load_average_before": os.getloadavg()[0],
    }
    if peers_python().exists():
        peer_packages = ["dbos", "edda-framework", "sqlalchemy", "psycopg", "asyncpg", "aiosqlite", "uvloop"]
        info["peers_venv"] = versions(str(peers_python()), peer_packages)
    return info


# -- the report --------------------------------------------------------------------------------------------
def medians(results: list[dict[str, Any]], metric: Metric) -> float | None:
    values = [r[metric.key] for r in results if isinstance(r.get(metric.key), int | float)]
    values = [v for v in values if v == v]  # no NaN
    return statistics.median(values) if values else None


def summarise(all_cases: list[Case], raw: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    rows = []
    for case in all_cases:
        for metric in case.metrics:
            row: dict[str, Any] = {"case": case.key, "title": case.title, "metric": metric.key}
            row.update(
                {"label": metric.label, "unit": metric.unit, "higher_is_better": metric.higher_is_better}
            )
            row["values"], row["runs"], row["na"] = {}, {}, {}
            for entrant in case.entrants:
                results = raw[case.key][entrant.name]
                na = next((r["na"] for r in results if "na" in r), None)
                errors = [r["error"] for r in results if "error" in r]
                ok = [r for r in results if "na" not in r and "error" not in r]
                row["runs"][entrant.name] = len(ok)
                if errors and ok:  # the median is over the runs that ended; the table says so
                    row.setdefault("failed", {})[entrant.name] = (len(errors), errors[0].splitlines()[0])
                if na is not None:
                    row["na"][entrant.name] = na
                elif not ok:
                    row["na"][entrant.name] = "failed: " + (errors[0].splitlines()[0] if errors else "no run")
                row["values"][entrant.name] = medians(ok, metric)
                samples = [r.get("n") for r in ok if r.get("n") is not None]
                if samples:
                    row.setdefault("samples", {})[entrant.name] = statistics.median(samples)
            rows.append(row)
    return rows


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def print_table(rows: list[dict[str, Any]], entrants: list[Entrant], runs: int) -> None:
    names = [e.name for e in entrants]
    peers = [n for n in names if n != "geste"]
    print(f"\nMedians of {runs} run(s); ratio = geste / peer (for rates higher is better, else lower).")
    header = f"{'case / metric':<58}" + "".join(f"{n:>13}" for n in names)
    header += "".join(f"{'geste/' + p:>19}" for p in peers)
    print(header)
    last = None
    for row in rows:
        if row["case"] != last:
            print(f"{row['title']}")
            last = row["case"]
        label = f"  {row['label']}" + (f" ({row['unit']})" if row["unit"] and row["unit"] != "/s" else "")
        cells = "".join(f"{fmt(row['values'].get(n)) if n in row['values'] else '-':>13}" for n in names)
        ratios = ""
        g = row["values"].get("geste")
        for p in peers:
            v = row["values"].get(p)
            ratios += (
                f"{(g / v) if g is not None and v else float('nan'):>19.3g}"
                if p in row["values"]
                else f"{'-':>19}"
            )
        print(f"{label:<58}{cells}{ratios}")
    notes = {(name, reason) for row in rows for name, reason in row["na"].items()}
    if notes:
        print("\nn/a:")
        for name, reason in sorted(notes):
            print(f"  {name}: {reason}")
    sampled = [
        (row["title"], row["samples"]) for row in rows if row.get("samples") and row["metric"] == "p50_ms"
    ]
    for title, samples in sampled:
        counts = ", ".join(f"{k} {v:g}" for k, v in samples.items())
        print(f"  samples per run, {title}: {counts}")
    for line in failed_runs(rows):
        print(f"  {line}")


def markdown(rows: list[dict[str, Any]], entrants: list[Entrant], runs: int, info: dict[str, Any]) -> str:
    """The table as Markdown (results/compare.md), for benchmarks/README.md."""
    names = [e.name for e in entrants]
    peers = [n for n in names if n != "geste"]
    lines = [
        f"Medians of {runs} run(s), {info['cpus']} cores, {info['postgresql'].split(' on ')[0]};"
        f" geste {info.get('geste_commit', '?')}. Ratio: geste / peer.",
        "",
        "| scenario | figure | " + " | ".join(names) + " | " + " | ".join(f"geste/{p}" for p in peers) + " |",
        "|---|---|" + "---:|" * (len(names) + len(peers)),
    ]
    for row in rows:
        unit = f" ({row['unit']})" if row["unit"] and row["unit"] != "/s" else ""
        cells = [fmt(row["values"].get(n)) if n in row["values"] else "-" for n in names]
        g = row["values"].get("geste")
        ratios = []
        for p in peers:
            v = row["values"].get(p)
            ratios.append(f"{g / v:.3g}" if p in row["values"] and g is not None and v else "-")
        lines.append(f"| {row['title']} | {row['label']}{unit} | " + " | ".join(cells + ratios) + " |")
    notes = sorted({(name, reason) for row in rows for name, reason in row["na"].items()})
    if notes:
        lines += ["", *(f"- n/a, {name}: {reason}" for name, reason in notes)]
    for row in rows:
        if row.get("samples") and row["metric"] == "p50_ms":
            counts = ", ".join(f"{k} {v:g}" for k, v in row["samples"].items())
            lines.append(f"- samples per run, {row['title']}: {counts}")
    lines += [f"- {line}" for line in failed_runs(rows)]
    return "\n".join(lines) + "\n"


def failed_runs(rows: list[dict[str, Any]]) -> list[str]:
    """One line per case and entrant where some runs failed: the median is over the others."""
    seen: dict[tuple[str, str], str] = {}
    for row in rows:
        for name, (count, error) in row.get("failed", {}).items():
            seen[(row["title"], name)] = (
                f"{name}, {row['title']}: {count} run(s) failed ({error}); the median is over the rest"
            )
    return list(seen.values())


def draw(path_json: Path, path_png: Path) -> None:
    subprocess.run(
        [str(peers_python()), str(PEERS_DIR / "chart.py"), str(path_json), str(path_png)], check=True
    )


def report(
    args: argparse.Namespace,
    chosen: list[Case],
    raw: dict[str, dict[str, list[dict[str, Any]]]],
    info: dict[str, Any],
    runs: int,
    done: int,
    began: float | None,
    generated: str | None = None,
) -> None:
    """Print the table and write compare.json and compare.png (after every run: a stop leaves them).
    ``began`` None: the results are an earlier run's (``--from-json``), the machine's readings stay."""
    if began is not None:
        info["load_average_after"] = os.getloadavg()[0]
        info["total_seconds"] = round(time.monotonic() - began)
    entrants = [e for e in (GESTE, DBOS, DBOS_THREADS, EDDA) if any(e in c.entrants for c in chosen)]
    rows = summarise(chosen, raw)
    print(f"\nmachine: {json.dumps(info)}")
    print_table(rows, entrants, done)
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "generated": generated or time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": args.quick,
        "runs": done,
        "runs_planned": runs,
        "machine": info,
        "entrants": [e.name for e in entrants],
        "cases": [
            {
                "key": c.key,
                "title": c.title,
                "scenario": c.scenario,
                "options": c.options,
                "overrides": c.overrides,
            }
            for c in chosen
        ],
        "rows": rows,
        "raw": raw,
    }
    path_json = args.out / "compare.json"
    path_json.write_text(json.dumps(document, indent=1) + "\n")
    (args.out / "compare.md").write_text(markdown(rows, entrants, done, info))
    print(f"\nwrote {path_json}")
    if peers_python().exists():
        draw(path_json, args.out / "compare.png")
        print(f"wrote {args.out / 'compare.png'}")
    else:
        print("(no chart: benchmarks/.peers-venv, which has matplotlib, is missing)")


def again(args: argparse.Namespace) -> None:
    """The report of earlier compare.json files, with this version's cases and metrics. Several files
    (runs of different cases, on the same machine) are merged; the first gives the machine and date."""
    docs = [json.loads(path.read_text()) for path in args.from_json]
    doc = docs[0]
    for other in docs[1:]:
        doc["raw"].update(other["raw"])
    args.quick = bool(doc["quick"])
    args.systems, args.scenarios = "geste,dbos,edda", ""
    chosen = [c for c in cases(args) if c.key in doc["raw"]]
    for case in chosen:
        case.entrants = [e for e in case.entrants if e.name in doc["raw"][case.key]]
    runs = int(doc["runs"])
    report(args, chosen, doc["raw"], doc["machine"], int(doc["runs_planned"]), runs, None, doc["generated"])


# -- main --------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, help="runs per system and case (default 5; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes and 1 run: a smoke check")
    parser.add_argument("--systems", default="geste,dbos,edda", help="comma-separated: geste, dbos, edda")
    parser.add_argument(
        "--scenarios", default="", help="comma-separated scenarios or case keys (default all)"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for one measurement")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where compare.json and compare.png go")
    parser.add_argument("--no-install", action="store_true", help="use benchmarks/.peers-venv as it is")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="measure nothing: print, write and draw again from compare.json file(s) (cases merged)",
    )
    args = parser.parse_args()
    if args.from_json is not None:
        again(args)
        return
    runs = args.runs if args.runs is not None else (1 if args.quick else 5)
    peers_wanted = any(s != "geste" for s in args.systems.split(","))
    if peers_wanted and not args.no_install:
        ensure_peers_venv()
    chosen = cases(args)
    info = machine()
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        c.key: {e.name: [] for e in c.entrants} for c in chosen
    }
    began = time.monotonic()
    progress = Progress(runs * sum(len(c.entrants) for c in chosen))
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(runs):
            for case in chosen:
                for entrant in case.entrants:  # alternating: every system once, then the next run
                    if any("na" in r for r in raw[case.key][entrant.name]):
                        progress.done(f"run {run + 1}/{runs} {case.key:<22} {entrant.name:<13} n/a")
                        continue  # it said n/a once: it will again
                    progress.measuring(f"run {run + 1}/{runs} {case.key} {entrant.name}")
                    took = time.monotonic()
                    try:
                        timeout = min(args.timeout, case.timeout or args.timeout)
                        out = asyncio.run(measure(case, entrant, Path(tmp), timeout))
                    except Exception as exc:
                        out = {"error": f"{type(exc).__name__}: {exc}"}
                    out["run"] = run + 1
                    raw[case.key][entrant.name].append(out)
                    status = "n/a" if "na" in out else ("FAILED" if "error" in out else "ok")
                    line = f"run {run + 1}/{runs} {case.key:<22} {entrant.name:<13} {status:<6}"
                    line += f" {time.monotonic() - took:6.1f} s"
                    progress.done(line + (f"\n  {out['error']}" if "error" in out else ""))
            if run + 1 < runs:
                report(args, chosen, raw, info, runs, run + 1, began)  # a stop leaves the runs so far
    progress.close()
    report(args, chosen, raw, info, runs, runs, began)


if __name__ == "__main__":
    main()
