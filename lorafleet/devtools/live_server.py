"""A real lorafleet server in a child process on loopback (`lorafleet serve --no-ray`), for tests
and reliability runs that need a live HTTP server, its process (RSS, kill) and its log."""

from __future__ import annotations

# Imports inside functions: psutil and the server only when a server is started.
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from lorafleet.local_cluster import free_port


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def __enter__(self) -> "LiveServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_live_server(directory: Path, ready_timeout_s: float = 120.0, **settings) -> LiveServer:
    """Write ``settings`` (ServeSettings fields) as YAML, start the server, wait for /readyz."""
    from lorafleet.serve.server import wait_ready

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = {"host": "127.0.0.1", "port": free_port(), **settings}
    config = directory / "serve.yaml"
    config.write_text(yaml.safe_dump(settings))
    log_path = directory / "server.log"
    with log_path.open("wb") as log:
        command = [sys.executable, "-m", "lorafleet.cli", "serve", "--no-ray", "--config", str(config)]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://{settings['host']}:{settings['port']}", process, log_path)
    try:
        wait_ready(server.url, ready_timeout_s, alive=lambda: process.poll() is None)
    except BaseException:
        server.stop()
        raise RuntimeError(f"the server did not become ready; its log:\n{server.log()[-3000:]}") from None
    return server
