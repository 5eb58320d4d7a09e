"""One chaos run, start to finish: the controller's load and faults, then the checker; and its report."""

from __future__ import annotations

import time
from pathlib import Path

from .checker import check
from .controller import ChaosConfig, Controller


async def run_chaos(url: str, folder: Path, config: ChaosConfig) -> str:
    """Run the load under faults on ``url`` and check it; return the report, or raise ``AssertionError``
    with the report of what failed (and the controller's journal)."""
    backend = "PostgreSQL" if url.startswith("postgres") else "SQLite"
    began = time.monotonic()
    controller = Controller(url, folder, config)
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
    lines = [
        f"chaos run on {backend}: {config.orders} orders, {config.workers} workers, "
        f"{time.monotonic() - began:.1f}s (seed {controller.seed})",
        "  what the controller did:",
        *(f"    {n:5d}  {what}" for what, n in sorted(counts.items())),
        f"    {controller.listener_reconnects:5d}  listener reconnects (workers' own count, survivors)",
        "  what the checker verified:",
        *(f"    {line}" for line in checks),
    ]
    return "\n".join(lines)
