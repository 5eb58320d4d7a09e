"""The runtime: what runs in the background of a process while its App is open.

``Runtime`` (built from a storage, ``RuntimeOptions`` and the engine as a ``Runner``) owns the worker
(``worker``: claim loop, heartbeat), its wake-ups (``wakeups``: local timers, LISTEN/NOTIFY, polling),
the outbox relay (``relay``) and the channel chores (``chores``), all on one loop base (``loops``). It
imports the storage and the core, never the engine or the App.
"""

from __future__ import annotations

from ._runtime import OpenClose, Runtime, RuntimeOptions
from .worker import Runner

__all__ = ["OpenClose", "Runner", "Runtime", "RuntimeOptions"]
