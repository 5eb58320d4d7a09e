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
}
"""The README keeps one example (a first workflow); the others live in the guides of docs/, where
``tests/test_docs_examples.py`` runs them with the output each states."""


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
