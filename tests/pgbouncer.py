"""A PgBouncer of the tests' own, in transaction mode, in front of the test database.

``PgBouncer.start`` writes a configuration in a temporary folder, runs Debian's ``pgbouncer`` (installed
by ``.ci/ensure-pgbouncer``) on a free port of 127.0.0.1, and waits until it accepts connections;
``stop`` ends it. ``through`` turns a test's direct URL into one through it, with geste's
``pooler=transaction`` option. Authentication is ``trust`` (the server behind trusts 127.0.0.1 too).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
POOL_SIZE = 10
"""Server connections per database and user: PostgreSQL's max_connections is shared."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PgBouncer:
    """One pgbouncer process in transaction mode, in front of the database of ``direct_url``."""

    def __init__(self, direct_url: str) -> None:
        self.direct_url = direct_url
        parts = urlsplit(direct_url)
        self.user = parts.username or "postgres"
        self.database = parts.path.lstrip("/") or self.user
        self.server = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.port = 0
        self.folder: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if not os.access(PGBOUNCER, os.X_OK):
            raise RuntimeError(
                f"pgbouncer is required by the tests and is not installed ({PGBOUNCER}): "
                "bash .ci/ensure-pgbouncer"
            )
        self.folder = Path(tempfile.mkdtemp(prefix="geste-pgbouncer-"))
        self.folder.chmod(0o755)  # pgbouncer refuses to run as root: it runs as postgres then, and reads it
        self.port = _free_port()
        (self.folder / "users.txt").write_text(f'"{self.user}" ""\n')
        host, port = self.server
        (self.folder / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"{self.database} = host={host} port={port} dbname={self.database}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.folder / 'users.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {POOL_SIZE}\n"
            "max_client_conn = 1000\n"
            "server_lifetime = 3600\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
        )
        for name in ("users.txt", "pgbouncer.ini"):
            (self.folder / name).chmod(0o644)
        self._run()

    def _run(self) -> None:
        assert self.folder is not None
        cmd = [PGBOUNCER, str(self.folder / "pgbouncer.ini")]
        if os.geteuid() == 0:
            # pgbouncer refuses root; its own -u would change user after the exec, which clears the
            # parent-death signal: setpriv changes user first, then sets it
            user = ["--reuid=postgres", "--regid=postgres", "--clear-groups", "--pdeathsig=KILL"]
            cmd = ["setpriv", *user, *cmd]
        from .conftest import die_with_parent

        log = (self.folder / "pgbouncer.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        log.close()
        deadline = time.monotonic() + 15
        while not self._accepts():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = (self.folder / "pgbouncer.log").read_text()
                self.stop()
                raise RuntimeError(f"pgbouncer did not start on port {self.port}:\n{output}")
            time.sleep(0.05)

    def crash_and_restart(self) -> None:
        """SIGKILL the process (every client and server connection drops at once) and start it again on
        the same port: a pooler that crashed and came back."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._run()

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM: pgbouncer closes its connections and exits
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def through(self, url: str) -> str:
        """``url`` (a direct URL to the same server, its geste options kept) through this pgbouncer."""
        parts = urlsplit(url)
        netloc = f"{parts.username or self.user}@127.0.0.1:{self.port}"
        query = f"{parts.query}&pooler=transaction" if parts.query else "pooler=transaction"
        return urlunsplit(parts._replace(netloc=netloc, query=query))
