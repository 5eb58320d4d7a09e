"""The package as released: one version source, the files a wheel carries, the typed API from a user's side,
the changelog's form. `.ci/check-wheel` (run by `make test`) checks the built wheel itself; these tests are
the fast, offline half of it."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import geste

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path(geste.__file__).resolve().parent
EXAMPLE = ROOT / "tests" / "typing" / "user_example.py"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
CHANGELOG = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
USER_ENV = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "MYPYPATH", "VIRTUAL_ENV"}}
"""A user's shell: mypy finds geste only where the environment given to it installed it."""
SEMVER = r"\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?"


def test_the_version_has_one_source() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "geste.__version__"}
    # setuptools reads the literal without importing geste: it must stay a plain string assignment.
    init = (SOURCE / "__init__.py").read_text(encoding="utf-8")
    assert re.findall(r'^__version__ = "([^"]+)"$', init, re.M) == [geste.__version__]
    assert re.fullmatch(SEMVER, geste.__version__)
    # No other file of the package writes the version down.
    for path in SOURCE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if path.name != "__init__.py" or path.parent != SOURCE:
            assert f'"{geste.__version__}"' not in text, path
            assert not re.search(r"^__version__\s*=", text, re.M), path


def test_the_cli_reports_the_version() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from geste.cli import main; main()", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"geste, version {geste.__version__}"


def test_package_data_covers_every_file_of_the_package() -> None:
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["geste"]
    assert "py.typed" in patterns and (SOURCE / "py.typed").is_file()
    others = [
        path.relative_to(SOURCE).as_posix()
        for path in SOURCE.rglob("*")
        if path.is_file() and path.suffix not in {".py", ".pyc"} and "__pycache__" not in path.parts
    ]
    assert any(name.endswith(".sql") for name in others)
    uncovered = [name for name in others if not any(fnmatch.fnmatch(name, p) for p in patterns)]
    assert not uncovered, f"files of src/geste no package-data pattern ships: {uncovered}"


def test_build_and_twine_are_dev_tools_and_make_test_runs_the_wheel_check() -> None:
    dev = " ".join(PYPROJECT["project"]["optional-dependencies"]["dev"])
    assert "build" in dev and "twine" in dev and "mypy" in dev
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    test_target = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert ".ci/check-wheel" in test_target
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


MYPY = [sys.executable, "-m", "mypy", "--strict", "--config-file", "", "--no-incremental"]
"""A user's `mypy --strict`: no configuration of this repository, no cache shared between runs."""


def _site(folder: Path, *paths: Path) -> Path:
    """A virtual environment (no pip) whose site-packages holds ``paths`` through a .pth file, as an
    editable install does: for mypy, a package found there is a third-party one, typed only if it carries
    `py.typed`. Returns its python, for `mypy --python-executable`."""
    venv.EnvBuilder(with_pip=False, clear=True).create(folder)
    python = folder / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "under-test.pth").write_text("".join(f"{p}\n" for p in paths), encoding="utf-8")
    return python


def _mypy(python: Path, source: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """`mypy --strict` on ``source``, in a folder of its own: nothing of the repository on its path."""
    example = folder / "user_example.py"
    folder.mkdir()
    example.write_text(source, encoding="utf-8")
    return subprocess.run(
        [*MYPY, "--python-executable", str(python), "-v", str(example)],
        cwd=folder,
        env=USER_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_user_example_passes_mypy_strict_against_the_package(tmp_path: Path) -> None:
    import pydantic

    dependencies = Path(pydantic.__file__).resolve().parent.parent  # those of the running interpreter
    python = _site(tmp_path / "site", SOURCE.parent, dependencies)
    done = _mypy(python, EXAMPLE.read_text(encoding="utf-8"), tmp_path / "typed")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    # The geste it checked against is this tree's, found as an installed package.
    assert f"Parsing {SOURCE / '__init__.py'} (geste)" in done.stderr


def test_without_py_typed_mypy_refuses_the_package(tmp_path: Path) -> None:
    """The marker is what makes the example pass: a copy of the package without it fails the same check."""
    copy = tmp_path / "pkg" / "geste"
    shutil.copytree(SOURCE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "py.typed").unlink()
    python = _site(tmp_path / "site", copy.parent)
    done = _mypy(python, "import geste\n\napp: geste.App = geste.App()\n", tmp_path / "typed")
    assert done.returncode == 1
    assert "missing library stubs or py.typed marker" in done.stdout


def test_the_user_example_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "result: {'charge': 'ch_A-1', 'audit': 6, 'by': 'ada'}" in done.stdout
    assert "4 event approved" in done.stdout
    assert "A-2: WorkflowCancelled" in done.stdout


# Keep a Changelog: https://keepachangelog.com/en/1.1.0/
KINDS = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
EXTRA_KINDS = {"Naming decisions"}  # geste's own: API spellings chosen where the design left them open


def test_the_changelog_follows_keep_a_changelog() -> None:
    lines = CHANGELOG.splitlines()
    assert lines[0] == "# Changelog"
    assert "https://keepachangelog.com/en/1.1.0/" in CHANGELOG
    assert "https://semver.org/spec/v2.0.0.html" in CHANGELOG
    sections = [line for line in lines if line.startswith("## ")]
    assert sections[0] == "## [Unreleased]"
    released = []
    for header in sections[1:]:
        found = re.fullmatch(rf"## \[({SEMVER})\] - (\d{{4}}-\d{{2}}-\d{{2}})", header)
        assert found, f"a release header is '## [X.Y.Z] - YYYY-MM-DD': {header!r}"
        released.append(found.group(1))
    assert len(set(released)) == len(released)
    assert released == sorted(released, key=_order, reverse=True), "releases newest first"
    kinds = {line[4:] for line in lines if line.startswith("### ")}
    assert kinds <= KINDS | EXTRA_KINDS, kinds - KINDS - EXTRA_KINDS
    # Every version header links to its changes, the link definitions at the end.
    links = dict(re.findall(r"^\[([^\]]+)\]: (\S+)$", CHANGELOG, re.M))
    for name in ["Unreleased", *released]:
        assert name in links, f"no link definition for [{name}]"
    tail = lines[-len(links) :]
    assert all(re.match(r"^\[[^\]]+\]: ", line) for line in tail), "the link definitions come last"
    # geste.__version__ is the last release or the next one (docs/releasing.md): never behind.
    if released:
        assert _order(geste.__version__) >= _order(released[0])
        if geste.__version__ != released[0]:
            assert links["Unreleased"].endswith(f"v{released[0]}...HEAD")


def _order(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("-")[0].split("."))
