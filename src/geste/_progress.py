"""Progress of a long command-line operation (migrations, bulk cancel): one helper for every command.

On a terminal it is a ``rich`` progress bar; anywhere else (a pipe, a log file, the tests) it writes plain
lines, one per tenth of the work, so the output stays readable and small. A command printing JSON turns
it off (``enabled=False``), so nothing but the JSON reaches stdout.

    with Progress("cancelling", total=len(ids)) as progress:
        for instance_id in ids:
            ...
            progress.advance()
        progress.note("all done")
"""

from __future__ import annotations

import sys
import threading
from types import TracebackType
from typing import Any, TextIO

PLAIN_STEPS = 10
"""Plain lines per operation of known size (one per tenth), besides the notes."""
PLAIN_EVERY = 1000
"""Without a known size, a plain line every this many items."""


class Progress:
    """A progress display for ``total`` items (None: unknown), written to ``stream`` (default: stdout).

    ``advance`` and ``note`` may be called from another thread (a storage thread announcing migrations).
    """

    def __init__(
        self,
        description: str,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
    ) -> None:
        self.description = description
        self.total = total
        self.done = 0
        self.enabled = enabled
        self._stream = sys.stdout if stream is None else stream
        self._lock = threading.Lock()
        self._bar: Any = None
        self._task: Any = None
        self._shown = 0
        """Plain mode: the last tenth (or thousand) a line was written for."""

    @property
    def is_terminal(self) -> bool:
        isatty = getattr(self._stream, "isatty", None)
        try:
            return bool(isatty is not None and isatty())
        except ValueError:  # a closed stream
            return False

    def __enter__(self) -> Progress:
        if self.enabled and self.is_terminal:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(file=self._stream),
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def advance(self, count: int = 1, *, label: str | None = None) -> None:
        """``count`` more items done; with a ``label`` (a migration's name), a line of its own says so."""
        with self._lock:
            self.done += count
            if not self.enabled:
                return
            of = f"/{self.total}" if self.total is not None else ""
            if self._bar is not None:
                self._bar.update(self._task, advance=count)
            if label is not None:
                line = f"{self.description} {self.done}{of}: {label}"
                if self._bar is not None:
                    self._bar.console.print(line, markup=False, highlight=False)
                else:
                    self._write(line)
            if self._bar is not None or label is not None:
                return
            mark = self.done * PLAIN_STEPS // self.total if self.total else self.done // PLAIN_EVERY
            if mark > self._shown:
                self._shown = mark
                self._write(f"{self.description}: {self.done}{of}")

    def note(self, message: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if not self.enabled:
            return
        with self._lock:
            if self._bar is not None:
                self._bar.console.print(message, markup=False, highlight=False)
            else:
                self._write(message)

    def _write(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()
