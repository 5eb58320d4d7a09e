"""Every Python example of the README runs as written, each in a fresh folder."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
EXPECTED = {
    0: ["'reservation': 'reservation-book-2-", "1 activity reserve", "2 sleep sleep"],
    1: ["ch_A-1"],
    2: ["failed: card refused - still booked: []"],
    3: ["approved by ada"],
    4: [
        "still waiting",
        "cancelled",
        "resumed job-42 None",
        "went",
        "2 event go",
        "failed: carrier API down",
        "retry 1 from step 2 ['ship']",
        "shipped R-lamp",
        "is completed (retry 1 at ",
    ],
    5: ["shipped", "delivered order.shipped ORD-7:1 {'order_id': 'ORD-7'}", "ORD-7:1 delivered 1 None"],
    6: ["published 3 readings", "max 22.0 of [20.5, 22.0, 21.5]"],
    7: [
        "total: 12",
        "run 3 input {'args': ['ada'], 'kwargs': {'total': 7}}",
        "run 1 {} ['wait_event', 'event', 'continue_as_new']",
        "run 2 {'total': 3} ['wait_event', 'event', 'continue_as_new']",
    ],
    8: ["retries: 1.0", "completed: 1.0", "steps: 1.0", 'geste_activity_attempts_total{activity="fetch"} 2'],
    9: [
        "bob: cancelled",
        "ada: charged ada after 15 days, 0:30:00",
        "3 attempts, from 2030-01-16 00:00:00+00:00",
        "1 history replayed: 1 ok",
    ],
}


def test_the_readme_has_the_examples_this_test_expects() -> None:
    assert len(EXAMPLES) == len(EXPECTED)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index: int, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(EXAMPLES[index], encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for expected in EXPECTED[index]:
        assert expected in done.stdout, done.stdout
