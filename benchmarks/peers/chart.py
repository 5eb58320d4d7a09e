"""Draw benchmarks/results/compare.png from compare.json (run by compare.py with the peers' venv python).

    benchmarks/.peers-venv/bin/python benchmarks/peers/chart.py results/compare.json results/compare.png

One panel per scenario, one bar per system (groups where a panel shows several figures); "n/a" where a
system cannot run it. Latency panels use a logarithmic axis: the systems differ by orders of magnitude.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"geste": "#2a7ab9", "dbos": "#e4872b", "dbos-threads": "#f2bd6f", "edda": "#5aa05a"}

# (title, [(case key prefix, metric, group label)], y label, log scale)
PANELS: list[tuple[str, list[tuple[str, str, str]], str, bool]] = [
    ("Throughput, one process, PostgreSQL", [("throughput_pg", "workflows_per_s", "")], "workflows/s", False),
    (
        "Throughput, worker processes + a client, PostgreSQL",
        [("throughput_workers_pg", "workflows_per_s", "")],
        "workflows/s",
        False,
    ),
    ("Throughput, one process, SQLite", [("throughput_sqlite", "workflows_per_s", "")], "workflows/s", False),
    (
        "Transactions per workflow (PostgreSQL)",
        [("throughput_pg", "transactions_per_workflow", "")],
        "commits",
        False,
    ),
    ("Client CPU per workflow (PostgreSQL)", [("throughput_pg", "cpu_ms_per_workflow", "")], "ms", False),
    (
        "Wake-up across processes, PostgreSQL",
        [("wakeup_pg", "p50_ms", "p50"), ("wakeup_pg", "p99_ms", "p99")],
        "ms (log)",
        True,
    ),
    (
        "Durable sleep 100 ms: lateness, PostgreSQL",
        [("sleep_pg", "p50_ms", "p50"), ("sleep_pg", "p99_ms", "p99")],
        "ms (log)",
        True,
    ),
    (
        "Durable sleep 100 ms: lateness, SQLite",
        [("sleep_sqlite", "p50_ms", "p50"), ("sleep_sqlite", "p99_ms", "p99")],
        "ms (log)",
        True,
    ),
    ("Waiting workflows: worker memory", [("idle_pg", "rss_mib", "")], "RSS MiB", False),
    (
        "Waiting workflows: database load",
        [("idle_pg", "transactions_per_min", "")],
        "transactions/min",
        False,
    ),
    (
        "Resume after a restart vs history length, PostgreSQL",
        [("replay_", "from_start_ms", "*")],
        "ms (log)",
        True,
    ),
]


def label_of(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def main() -> None:
    source, target = sys.argv[1], sys.argv[2]
    with open(source) as f:
        doc: dict[str, Any] = json.load(f)
    rows = doc["rows"]
    entrants: list[str] = doc["entrants"]
    panels = []
    for title, picks, ylabel, log in PANELS:
        groups: list[tuple[str, dict[str, Any]]] = []
        for prefix, metric, group in picks:
            for row in rows:
                if row["case"].startswith(prefix) and row["metric"] == metric:
                    name = group if group != "*" else row["title"].split(", ")[1].replace(" recorded", "")
                    groups.append((name, row))
        if groups:
            panels.append((title, groups, ylabel, log))
    columns = 2
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(13, 3.6 * lines), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (title, groups, ylabel, log) in zip(axes.flat, panels, strict=False):
        shown = [e for e in entrants if any(e in row["values"] for _, row in groups)]
        width = 0.8 / max(1, len(shown))
        top = max((v for _, row in groups for v in row["values"].values() if v), default=1)
        for gi, (_, row) in enumerate(groups):
            for ei, name in enumerate(shown):
                x = gi + (ei - (len(shown) - 1) / 2) * width
                value = row["values"].get(name)
                if value is None:
                    if name in row["values"]:  # at the foot of the axis, in the entrant's place
                        ax.text(
                            x,
                            0.03,
                            f"{name}: n/a",
                            ha="center",
                            va="bottom",
                            fontsize=8,
                            rotation=90,
                            color="#666",
                            transform=ax.get_xaxis_transform(),
                        )
                    continue
                ax.bar(
                    x, value, width * 0.92, color=COLORS.get(name, "#999"), label=name if gi == 0 else None
                )
                ax.text(x, value, label_of(value), ha="center", va="bottom", fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(
            [g for g, _ in groups] if any(g for g, _ in groups) else [""] * len(groups), fontsize=8
        )
        if log:
            ax.set_yscale("log")
            low = min((v for _, row in groups for v in row["values"].values() if v), default=1)
            ax.set_ylim(low * 0.5, top * 6)
        else:
            ax.set_ylim(0, top * 1.3)
        ax.tick_params(axis="y", labelsize=8)
        ax.legend(fontsize=7, loc="upper left", ncol=len(shown))
        ax.grid(axis="y", alpha=0.3)
    kind = "quick run (small sizes, 1 run)" if doc.get("quick") else f"medians of {doc['runs']} run(s)"
    m = doc["machine"]
    fig.suptitle(
        f"geste vs DBOS {m.get('peers_venv', {}).get('dbos', '?')} vs Edda"
        f" {m.get('peers_venv', {}).get('edda-framework', '?')}: {kind}; {m['cpus']} cores,"
        f" {m['postgresql'].split(' on ')[0]} (local), {doc['generated']}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main()
