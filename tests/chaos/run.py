"""One chaos run, start to finish: the controller's load and faults, then the checker; and its report."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..pgbouncer import PgBouncer
from .checker import check
from .controller import ChaosConfig, Controller
from .replica import ReplicatedPair


@dataclass(frozen=True)
class ChaosReport:
    text: str
    faults: Counter[str]
    """How many times the controller did each thing (``"worker SIGKILLed and restarted"``, ...)."""
    lost_leases: int = 0
    """Leases live workers lost to another worker (their logs' "lease lost" warnings)."""

    def __str__(self) -> str:
        return self.text


async def run_chaos(
    url: str,
    folder: Path,
    config: ChaosConfig,
    *,
    pooler: PgBouncer | None = None,
    replicas: ReplicatedPair | None = None,
) -> ChaosReport:
    """Run the load under faults on ``url`` and check it; return the report, or raise ``AssertionError``
    with the report of what failed (and the controller's journal). With ``pooler``, the workers' and the
    client's pools go through that PgBouncer (the checker reads ``url`` directly). ``replicas``: the pair
    ``url`` names, for the ``failover`` fault."""
    backend = "PostgreSQL" if url.startswith("postgres") else "SQLite"
    if pooler is not None:
        backend += " through PgBouncer"
    began = time.monotonic()
    controller = Controller(url, folder, config, pooler=pooler, replicas=replicas)
    try:
        await controller.run()
        checks = await check(url, folder, config)
    except BaseException as exc:
        journal = "\n".join(controller.journal.lines[-40:])
        outputs = "\n".join(str(p) for p in controller.outputs)
        raise AssertionError(
            f"chaos run on {backend} failed: {exc}\n-- journal (last 40):\n{journal}\n"
            f"-- worker outputs:\n{outputs}"
        ) from exc
    counts = controller.journal.counts
    lost = controller.lost_leases()
    skews = sorted(controller.skews)
    lines = [
        f"chaos run on {backend}: {config.orders} orders, {config.workers} workers, "
        f"{time.monotonic() - began:.1f}s (seed {controller.seed})",
        "  what the controller did:",
        *(f"    {n:5d}  {what}" for what, n in sorted(counts.items())),
        f"    {controller.listener_reconnects:5d}  listener reconnects (workers' own count, survivors)",
        f"    {lost:5d}  leases lost by a live worker to another (workers' logs)",
        *(
            [f"    {len(skews):5d}  worker clocks skewed, from {skews[0]:+.2f}s to {skews[-1]:+.2f}s"]
            if skews
            else []
        ),
        *(f"    {remark}" for remark in controller.journal.remarks),
        "  what the checker verified:",
        *(f"    {line}" for line in checks),
    ]
    return ChaosReport("\n".join(lines), Counter(counts), lost)
