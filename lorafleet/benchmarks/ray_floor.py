"""Ray Serve's own floor on this machine, measured beside lorafleet in the same Serve instance.

A trivial FastAPI app is deployed next to lorafleet's (route prefix ``/ray-floor``) and called
through the same Ray proxy, interleaved with lorafleet's own ``/healthz``:

- ``proxy``: HTTP through Ray's proxy to a FastAPI deployment that answers at once;
- ``serve_handle``: the same, plus one call through a Serve handle to a second deployment (what the
  gateway does to reach a generator replica);
- ``multiplexed_handle``: that call with a multiplexed model id (lorafleet's routing by adapter set)
  against the plain handle call;
- ``actor_call``: the same hop as a plain Ray actor call, without Serve's router;
- ``json_body``: a POST with a small JSON body that the deployment reads: Ray's replica fetches a
  request's body from the proxy with a call of its own (``ASGIReceiveProxy``);
- ``json_body_multiplexed_handle``: both, the shape of ``POST /v1/generate`` without its work: the
  floor of lorafleet's request path outside the pass;
- ``lorafleet_healthz``: lorafleet's gateway (its middlewares, auth, metrics) through the proxy.

The hops are timed inside the FastAPI deployment as well as by the client.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, and Ray ships
# the classes below by value, without the module globals a string annotation would be looked up in.
# Imports inside functions: Ray and FastAPI load only when this benchmark runs.
import statistics
import time

from pydantic import BaseModel

FLOOR_APP = "ray-floor"
FLOOR_PREFIX = "/ray-floor"
PATHS = ("proxy", "serve_handle", "multiplexed_handle", "actor_call", "json_body", "json_body_multiplexed_handle")
HOPS = ("serve_handle", "multiplexed_handle", "actor_call", "json_body_multiplexed_handle")  # timed inside too


class Body(BaseModel):
    """A request body shaped like a small generate request."""

    prompt: str
    steps: int
    seed: int
    adapter: str
    cache: bool


BODY = {"prompt": "a red circle on the left", "steps": 20, "seed": 1, "adapter": "look@1", "cache": False}


def _floor_app():
    """The bound floor application (its classes are built here, so Ray loads only when asked)."""
    import ray
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class FloorInner:
        @serve.multiplexed(max_num_models_per_replica=4)
        async def model(self, model_id: str) -> str:
            return model_id

        async def echo(self, value: int) -> int:
            return value

        async def echo_multiplexed(self, value: int) -> int:
            await self.model(serve.get_multiplexed_model_id())
            return value

    @ray.remote(num_cpus=0)
    class FloorActor:
        async def echo(self, value: int) -> int:
            return value

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class FloorIngress:
        def __init__(self, inner):
            self.inner = inner
            self.actor = FloorActor.remote()

        @api.post("/proxy")
        async def proxy(self) -> dict:
            return {"hop_ms": 0.0}

        @api.post("/serve_handle")
        async def serve_handle(self) -> dict:
            return await _timed(self.inner.echo.remote(1))

        @api.post("/multiplexed_handle")
        async def multiplexed_handle(self) -> dict:
            return await _timed(self.inner.options(multiplexed_model_id="set-1").echo_multiplexed.remote(1))

        @api.post("/actor_call")
        async def actor_call(self) -> dict:
            return await _timed(self.actor.echo.remote(1))

        @api.post("/json_body")
        async def json_body(self, body: Body) -> dict:
            return {"hop_ms": 0.0}

        @api.post("/json_body_multiplexed_handle")
        async def json_body_multiplexed_handle(self, body: Body) -> dict:
            return await _timed(self.inner.options(multiplexed_model_id=body.adapter).echo_multiplexed.remote(1))

    return FloorIngress.bind(FloorInner.bind())


async def _timed(call) -> dict:
    started = time.perf_counter()
    await call
    return {"hop_ms": 1000 * (time.perf_counter() - started)}


def measure_ray_floor(url: str, rounds: int = 5, per_round: int = 30) -> dict:
    """Deploys the floor app into the running Serve instance (this process must be its driver),
    calls every path ``per_round`` times per round, interleaved, and removes it: medians in ms."""
    import httpx
    from ray import serve

    serve.run(_floor_app(), name=FLOOR_APP, route_prefix=FLOOR_PREFIX)
    client_ms: dict[str, list[float]] = {name: [] for name in (*PATHS, "lorafleet_healthz")}
    hop_ms: dict[str, list[float]] = {name: [] for name in HOPS}
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            calls = {name: (lambda name=name: http.post(f"{FLOOR_PREFIX}/{name}", json=BODY)) for name in PATHS}
            calls["lorafleet_healthz"] = lambda: http.get("/healthz")
            for call in calls.values():  # warm-up: connections, the multiplexed model, the actor
                for _ in range(5):
                    call().raise_for_status()
            for _ in range(rounds):
                for name, call in calls.items():
                    for _ in range(per_round):
                        started = time.perf_counter()
                        response = call()
                        client_ms[name].append(1000 * (time.perf_counter() - started))
                        response.raise_for_status()
                        if name in HOPS:
                            hop_ms[name].append(response.json()["hop_ms"])
    finally:
        serve.delete(FLOOR_APP)
    result = {f"floor_{name}_client_ms": round(statistics.median(values), 2) for name, values in client_ms.items()}
    result.update({f"floor_{name}_hop_ms": round(statistics.median(values), 2) for name, values in hop_ms.items()})
    return result
