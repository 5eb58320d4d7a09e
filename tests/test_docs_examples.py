"""Every Python example of the guides in ``docs/`` runs as written, each in a fresh folder.

A guide states what its example prints in an HTML comment right after the block, one expected piece of
output per line (each must appear in the standard output)::

    ```python
    print("hello")
    ```
    <!-- output:
    hello
    -->

Keeping the expectations beside the example (not in a table of indices, as for the README) lets guides be
written side by side without renumbering each other's examples.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"```python\n(.*?)```[ \t]*\n(?:<!-- output:\n(.*?)-->)?", re.DOTALL)


def _examples() -> list[tuple[str, str, list[str]]]:
    found = []
    for guide in sorted(DOCS.glob("*.md")):
        for number, match in enumerate(BLOCK.finditer(guide.read_text(encoding="utf-8")), 1):
            expected = [line.strip() for line in (match.group(2) or "").splitlines() if line.strip()]
            found.append((f"{guide.stem}-{number}", match.group(1), expected))
    return found


EXAMPLES = _examples()


def test_every_guide_example_states_what_it_prints() -> None:
    """An example with nothing to check would pass by merely not crashing."""
    assert all(expected for _, _, expected in EXAMPLES), [name for name, _, e in EXAMPLES if not e]


@pytest.mark.parametrize(
    ("code", "expected"), [(c, e) for _, c, e in EXAMPLES], ids=[n for n, _, _ in EXAMPLES]
)
def test_guide_example_runs(code: str, expected: list[str], tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for piece in expected:
        assert piece in done.stdout, done.stdout
