"""A real PostgreSQL server on loopback for tests: Debian's `postgresql` package, started here.

A fresh cluster in a temporary directory on a free port (trust authentication on 127.0.0.1 only,
no fsync: a test database). PostgreSQL refuses to run as root, so as root the cluster belongs to
the `postgres` user that the Debian package creates.
"""

from __future__ import annotations

# Imports inside functions: psycopg (a test extra) only when a server is started.
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lorafleet.local_cluster import free_port

USER = "lorafleet"


def _server_binaries() -> Path:
    """The directory holding initdb and postgres (Debian keeps them out of PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if not candidates:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (scripts/setup.sh does)")
    return Path(candidates[-1]).parent


def _as_owner(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass
class PostgresServer:
    """A running postgres; use as a context manager or call stop()."""

    process: subprocess.Popen
    port: int
    root: Path

    @property
    def url(self) -> str:
        """A SQLAlchemy URL of the cluster's `postgres` database (the psycopg 3 driver)."""
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)

    def __enter__(self) -> "PostgresServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(timeout: float = 60.0) -> PostgresServer:
    binaries = _server_binaries()
    root = Path(tempfile.mkdtemp(prefix="lorafleet-postgres-"))  # under /tmp: the owner can reach it
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, log = root / "data", root / "server.log"
    subprocess.run(_as_owner([str(binaries / "initdb"), "-D", str(data), "-U", USER, "-A", "trust", "-E", "UTF8",
                              "--no-sync"]), check=True, capture_output=True, text=True)
    port = free_port()
    command = [str(binaries / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
               "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off"]
    with open(log, "ab") as out:
        process = subprocess.Popen(_as_owner(command), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = PostgresServer(process, port, root)
    _wait_ready(server, log, timeout)
    return server


def _wait_ready(server: PostgresServer, log: Path, timeout: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"postgres exited ({server.process.returncode}); log: {log.read_text()[-2000:]}")
        try:
            psycopg.connect(host="127.0.0.1", port=server.port, user=USER, dbname="postgres", connect_timeout=2).close()
            return
        except psycopg.OperationalError:  # not up yet
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"postgres did not accept connections in {timeout}s; log: {log.read_text()[-2000:]}")
