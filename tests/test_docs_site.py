"""The documentation site (``mkdocs.yml``, mkdocs-material) builds with ``--strict``: a broken link or
anchor, a page left out of the navigation, or an API reference that no longer resolves fails it.

The guides' examples are executed by ``tests/test_docs_examples.py``; this checks the site around them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_site_builds_strictly_with_every_guide_and_the_api_reference(tmp_path: Path) -> None:
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    guides = sorted(p.stem for p in (ROOT / "docs").glob("*.md"))
    for guide in guides:  # every page of docs/ is in the site (omitted_files: warn fails --strict)
        assert (site / ("" if guide == "index" else guide) / "index.html").exists(), guide
    reference = (site / "reference" / "index.html").read_text(encoding="utf-8")
    documented = set(re.findall(r'id="(geste\.[A-Za-z_.]+)"', reference))
    import geste
    import geste.errors

    missing = {f"geste.{name}" for name in geste.__all__ if not name.startswith("_")} - documented
    assert not missing, missing  # every public name has its entry
    assert "geste.errors.GesteError" in documented
