"""A PostgreSQL primary and a streaming standby of the test's own, for the ``failover`` fault.

``ReplicatedPair`` makes both in a temporary folder with Debian's binaries (``initdb``, ``pg_ctl``,
``pg_basebackup`` of the newest ``/usr/lib/postgresql/N/bin``), each on a free port of 127.0.0.1 (never
the shared server's 5432), as the ``postgres`` OS user when run as root (``initdb`` refuses root). The
primary replicates synchronously by default (``synchronous_standby_names = '*'``, ``synchronous_commit =
on``): a commit is acknowledged only once the standby has flushed it. ``kill_primary`` SIGKILLs the
primary's postmaster and every backend (a lost machine: nothing is shut down, nothing sent),
``promote`` makes the standby the primary. ``url`` is the multi-host URL a user would give geste:
``postgresql://postgres@127.0.0.1:P1,127.0.0.1:P2/postgres?target_session_attrs=read-write``, which
connects to whichever of the two accepts writes. ``close`` stops both and removes the folder.

``fsync = off`` on both: the fault is a killed process, whose writes the OS keeps, so it changes no
outcome; it spares the shared machine's disk.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's binaries (``.ci/ensure-postgres`` installs them)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise AssertionError("no PostgreSQL binaries in /usr/lib/postgresql/*/bin: run .ci/ensure-postgres")
    return found[-1].parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Node:
    """One server of the pair: its data folder and port."""

    def __init__(self, pair: ReplicatedPair, name: str) -> None:
        self.pair = pair
        self.name = name
        self.data = pair.folder / name
        self.port = free_port()

    def ctl(self, *args: str) -> None:
        log = str(self.pair.folder / f"{self.name}.log")
        self.pair.run(str(self.pair.bin / "pg_ctl"), "-D", str(self.data), "-l", log, "-w", *args)

    def configure(self, **settings: Any) -> None:
        with (self.data / "postgresql.conf").open("a") as conf:
            for key, value in settings.items():
                conf.write(f"{key} = {value!r}\n" if isinstance(value, str) else f"{key} = {value}\n")

    def postmaster(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None


class ReplicatedPair:
    """A primary and its streaming standby (see the module's docstring). Use as a context manager."""

    def __init__(self, *, synchronous: bool = True) -> None:
        self.synchronous = synchronous
        self.bin = postgres_bin()
        self.folder = Path(tempfile.mkdtemp(prefix="geste-replica-"))
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.folder, "postgres", "postgres")
        self.primary = Node(self, "primary")
        self.standby = Node(self, "standby")
        self.promoted = False

    def run(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
        done = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")

    def start(self) -> ReplicatedPair:
        primary, standby = self.primary, self.standby
        initdb = str(self.bin / "initdb")
        self.run(initdb, "-D", str(primary.data), "-U", "postgres", "--auth=trust", "--no-sync")
        primary.configure(
            listen_addresses=HOST,
            port=primary.port,
            unix_socket_directories=str(self.folder),
            max_connections=60,
            wal_level="replica",
            max_wal_senders=4,
            fsync="off",
            synchronous_commit="on",
            synchronous_standby_names="*" if self.synchronous else "",
            wal_sender_timeout="5s",
        )
        primary.ctl("start")
        self.run(
            str(self.bin / "pg_basebackup"),
            *("-h", HOST, "-p", str(primary.port), "-U", "postgres"),
            *("-D", str(standby.data), "-R", "-X", "stream", "--checkpoint=fast"),
        )
        # once promoted, the standby has no standby of its own: it must not wait for one at each commit
        standby.configure(port=standby.port, synchronous_standby_names="", hot_standby="on")
        standby.ctl("start")
        self.wait_streaming()
        return self

    def wait_streaming(self, timeout: float = 30.0) -> None:
        """Until the primary streams to the standby (as a synchronous one, if so configured)."""
        want = "sync" if self.synchronous else "async"
        deadline = time.monotonic() + timeout
        while True:
            state = self.query(self.primary, "SELECT sync_state FROM pg_stat_replication")
            if state == want:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the standby is not streaming ({want}) after {timeout}s: {state!r}")
            time.sleep(0.05)

    def query(self, node: Node, sql: str) -> str:
        """One value read with psql (empty when no row; the error text when the server does not answer)."""
        where = ["-h", HOST, "-p", str(node.port), "-U", "postgres", "-d", "postgres"]
        done = subprocess.run(
            [str(self.bin / "psql"), *where, "-tAXc", sql],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return done.stdout.strip() if done.returncode == 0 else f"error: {done.stderr.strip()}"

    def url(self, **params: str) -> str:
        """The multi-host URL of the pair (the primary first), writes only: ``target_session_attrs``."""
        hosts = f"{HOST}:{self.primary.port},{HOST}:{self.standby.port}"
        query = "&".join(f"{k}={v}" for k, v in {"target_session_attrs": "read-write", **params}.items())
        return f"postgresql://postgres@{hosts}/postgres?{query}"

    def kill_primary(self) -> int:
        """SIGKILL the primary's postmaster and all its processes at once; return how many."""
        pid = self.primary.postmaster()
        if pid is None:
            raise AssertionError("the primary is not running")
        victims = [pid, *_children(pid)]
        for victim in victims:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while any(_alive(v) for v in [*victims, *_children(pid)]):
            if time.monotonic() > deadline:
                raise AssertionError("the primary's processes outlived SIGKILL")
            time.sleep(0.02)
        return len(victims)

    def stop_standby(self) -> None:
        """Stop the standby (it is cut off: the primary's commits no longer reach it)."""
        self.standby.ctl("stop", "-m", "fast")

    def start_standby(self) -> None:
        self.standby.ctl("start")

    def promote(self) -> None:
        """Promote the standby (``pg_ctl promote -w``: returns once it accepts writes)."""
        self.standby.ctl("promote")
        self.promoted = True
        deadline = time.monotonic() + 30
        while self.query(self.standby, "SELECT pg_is_in_recovery()") != "f":
            if time.monotonic() > deadline:
                raise AssertionError("the promoted standby still is in recovery")
            time.sleep(0.02)

    def close(self) -> None:
        """Stop both servers (immediately: nothing of theirs is kept) and remove the folder."""
        for node in (self.primary, self.standby):
            pid = node.postmaster()
            if pid is not None and _alive(pid):
                try:
                    node.ctl("stop", "-m", "immediate")
                except AssertionError:
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> ReplicatedPair:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
