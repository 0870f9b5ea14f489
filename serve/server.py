"""Starting and stopping the Serve app on a local (or given) Ray cluster."""

from __future__ import annotations

# Imports inside functions: Ray or uvicorn, whichever way the service is started.
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from lorafleet.local_cluster import free_port, secure_local_ray

from .app import APP_NAME, build_app
from .errors import ServiceUnavailable
from .heap import freeze_start_up_heap
from .ingress import HAPROXY_METRICS_PORT, HAPROXY_STATS_PORT, ray_serve_environment
from .settings import ServeSettings


@dataclass
class RunningServer:
    url: str
    settings: ServeSettings
    owns_ray: bool

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            if self.owns_ray:
                ray.shutdown()


def wait_ready(url: str, timeout_s: float = 180.0, alive=lambda: True) -> dict:
    """Poll /readyz until it answers 200 (give up early once ``alive()`` turns false)."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < deadline and alive():
            try:
                response = client.get(f"{url}/readyz")
                if response.status_code == 200:
                    return response.json()
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.5)
    raise ServiceUnavailable(f"server at {url} not ready after {timeout_s:.0f}s: {last}")


def start_server(settings: ServeSettings, ray_address: str | None = None, num_cpus: int | None = None) -> RunningServer:
    """Start Ray (a local cluster unless ``ray_address``), Serve, and the app; wait for /readyz."""
    import ray
    from ray import serve

    owns_ray = not ray.is_initialized()
    job_server = settings.trainings is not None and not settings.trainings.ray_address
    if owns_ray:
        address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
        local = address == "local"
        if local:
            secure_local_ray()
            os.environ.update(local_ray_serve_environment(settings))
        context = ray.init(address=address, num_cpus=(num_cpus or os.cpu_count()) if local else None,
                           include_dashboard=job_server and local, dashboard_host="127.0.0.1",
                           dashboard_port=free_port(), log_to_driver=False)
        if job_server and local:  # trainings run as Ray jobs on this cluster
            settings = settings.model_copy(update={"trainings": settings.trainings.model_copy(
                update={"ray_address": f"http://{context.dashboard_url}"})})
    if settings.trainings is not None and not settings.trainings.ray_address:
        raise ServiceUnavailable("trainings need the training cluster's job server: set trainings.ray_address "
                                 "(http://HEAD:8265)", field="trainings.ray_address")
    try:
        serve.start(proxy_location=settings.proxy_location.value,
                    http_options={"host": settings.host, "port": settings.port})
        _check_serve_listens_where_asked(settings)
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    except BaseException:
        if owns_ray:  # e.g. the port was taken meanwhile: leave nothing running behind
            serve.shutdown()
            ray.shutdown()
        raise
    server = RunningServer(url=f"http://{settings.host}:{settings.port}", settings=settings, owns_ray=owns_ray)
    try:
        wait_ready(server.url)
    except BaseException:
        server.stop()
        raise
    return server


def _check_serve_listens_where_asked(settings: ServeSettings) -> None:
    """Serve already running on a cluster keeps its HTTP options (Ray only warns): fail now, naming
    the port, rather than wait for a server on a port that nothing will open."""
    from ray.serve.context import _get_global_client

    running = _get_global_client().http_config
    if (running.host, running.port) != (settings.host, settings.port):
        raise ServiceUnavailable(f"Ray Serve already listens on {running.host}:{running.port} on this cluster, "
                                 f"not {settings.host}:{settings.port}: use that port, or shut Serve down first",
                                 field="port")


def local_ray_serve_environment(settings: ServeSettings) -> dict[str, str]:
    """The Serve switches for a Ray cluster started on this machine: the settings' ingress, with
    HAProxy's own metrics and stats on free ports (Ray's fixed defaults would clash between two
    servers on one machine)."""
    return {**ray_serve_environment(settings.ingress, settings.ingress_drain_s),
            HAPROXY_METRICS_PORT: str(free_port()), HAPROXY_STATS_PORT: str(free_port())}


def serve_in_process(settings: ServeSettings) -> None:
    """The whole service in this process with uvicorn, no Ray (one replica): development and tests.

    Blocks until SIGINT/SIGTERM; requests in flight finish first.
    """
    import uvicorn

    from .app import create_local_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, _ = create_local_app(settings)
    freeze_start_up_heap()
    print(f"lorafleet is serving base {settings.base!r} at http://{settings.host}:{settings.port} "
          "(in-process, no Ray); Ctrl-C stops it", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=30)


@contextmanager
def serving_in_thread(settings: ServeSettings, registry=None) -> Iterator[str]:
    """The in-process service (no Ray) on ``settings.host:port`` from a background thread, for
    callers that generate over HTTP from the same process (the concept runs); yields its URL."""
    import uvicorn

    from .app import create_local_app

    app, _ = create_local_app(settings, registry)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="lorafleet-http", daemon=True)
    thread.start()
    try:
        url = f"http://{settings.host}:{settings.port}"
        wait_ready(url, alive=thread.is_alive)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def install_stop_handlers() -> threading.Event:
    """An event set by SIGINT/SIGTERM (install after ray.init, which sets its own handlers)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop
