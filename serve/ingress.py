"""How HTTP reaches the gateway on Ray Serve: the one place that knows Ray Serve's ingress switches.

- ``haproxy`` (default): Ray Serve's direct ingress behind HAProxy, in Ray's throughput-optimized
  mode. HAProxy (a C proxy, one per node, on the serve port) forwards each connection to the
  gateway replica's own HTTP server; the gateway reaches generator replicas over gRPC; user code
  and the router run on the replica's main event loop. No Python proxy, no second call for a
  request's body.
- ``ray_proxy``: Ray Serve's Python proxy actor in front of the gateway (Ray's classic path).

These are switches of the whole Ray cluster, read once by every Serve process when it starts
(controller, proxies, replicas): they go into the environment of the processes that start Ray.
lorafleet sets them itself for a local cluster it starts; a cluster started elsewhere (KubeRay:
``k8s/base/rayservice.yaml``, whose containers carry :func:`ray_serve_environment`) has its own, and
the gateway reports the ingress actually in force (``/readyz`` ``ingress``).
"""

from __future__ import annotations

# Imports inside functions: Ray's Serve constants only inside a Serve process.
from enum import Enum


class Ingress(str, Enum):
    haproxy = "haproxy"
    ray_proxy = "ray-proxy"


DEFAULT_INGRESS = Ingress.haproxy
IN_PROCESS = "in-process"  # the whole service in one process (uvicorn, no Ray): no ingress to choose

THROUGHPUT_OPTIMIZED = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
HAPROXY = "RAY_SERVE_ENABLE_HA_PROXY"
DIRECT_INGRESS = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
DRAIN_PERIOD = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
HAPROXY_METRICS_PORT = "RAY_SERVE_HAPROXY_METRICS_PORT"
HAPROXY_STATS_PORT = "RAY_SERVE_HAPROXY_STATS_PORT"


def ray_serve_environment(ingress: Ingress, drain_s: float) -> dict[str, str]:
    """The environment a Ray cluster's processes need for ``ingress`` (every switch spelled out,
    so a process that started one cluster can start another with the other ingress).

    ``drain_s``: how long a stopping gateway replica keeps answering so HAProxy can take it out of
    rotation first (Ray's default, 30 s, suits external load balancers; HAProxy learns of a
    stopping replica from Ray within a fraction of a second).
    """
    on = "1" if ingress is Ingress.haproxy else "0"
    return {THROUGHPUT_OPTIMIZED: on, HAPROXY: on, DIRECT_INGRESS: on, DRAIN_PERIOD: f"{drain_s:g}"}


def ingress_in_force() -> Ingress:
    """The ingress of the Ray cluster this Serve process belongs to, as Ray Serve read it."""
    from ray.serve._private import constants

    return Ingress.haproxy if constants.RAY_SERVE_ENABLE_HA_PROXY else Ingress.ray_proxy
