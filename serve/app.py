"""The Serve application: a FastAPI gateway and generator replicas, on Ray Serve or in-process.

    Gateway (FastAPI ingress: auth, limits, adapter resolution, metrics)
        --handle.options(multiplexed_model_id=<adapter set>)--> Generator replicas (base + adapters)

``app_builder`` is the import path for ``serve build`` / ``serve deploy`` / a RayService:
``lorafleet.serve.app:app_builder`` with the settings as ``args``.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from lorafleet.registry import AdapterRegistry
from lorafleet.training.service.scheduler import TrainingService

from .api import create_api
from .auth import TokenTable
from .backends import LocalGeneratorBackend, RayGeneratorBackend
from .heap import freeze_start_up_heap
from .ingress import ingress_in_force
from .replica import GenerationTask, GeneratorReplica
from .replica_router import ROUTER_CLASS
from .service import GenerationService
from .settings import ServeSettings

GATEWAY_NAME = "Gateway"
GENERATOR_NAME = "Generator"
APP_NAME = "lorafleet"
logger = logging.getLogger(__name__)
# Adapter-set ids a replica keeps as routing markers. They are strings, so keeping many costs little:
# Ray sets one gauge per marker every 0.1 s (0.12 ms for 64 here). Evicting one costs more: a request
# for an evicted set loads it again, and the replica re-announces its ids to the controller, which
# broadcasts them to every router, up to ten times a second while sets churn. With 64 markers and
# traffic over 100 adapters, `tiny` through HTTP reached 0.90-0.94 of the no-adapter throughput in
# three runs; with 128 or 256, 0.95-0.99 in six (docs/benchmarks.md, runs P1-P6 and Q1-Q3).
MULTIPLEX_SLOTS = 256


def training_service(settings: ServeSettings, registry: AdapterRegistry) -> TrainingService | None:
    """The training service the settings ask for, on the registry's storage (None: trainings off)."""
    if settings.trainings is None:
        return None
    return TrainingService(settings.trainings, registry.store, registry.uri,
                           outbound=settings.webhooks)


def create_local_app(settings: ServeSettings, registry: AdapterRegistry | None = None):
    """The whole service in this process (no Ray): for tests and a single-process server."""
    registry = registry or AdapterRegistry(settings.registry)
    replica = GeneratorReplica(settings, registry)
    backend = LocalGeneratorBackend(replica, settings.max_ongoing_requests + settings.cut_in_places,
                                    settings.max_queued_requests)
    service = GenerationService(settings, backend, registry)
    return create_api(service, TokenTable.from_settings(settings), training_service(settings, registry)), service


@serve.deployment(name=GENERATOR_NAME)
class GeneratorDeployment:
    """One replica: the frozen base in accelerator memory and its adapter tiers."""

    def __init__(self, settings: dict):
        self.replica = GeneratorReplica(ServeSettings(**settings))
        freeze_start_up_heap()

    @serve.multiplexed(max_num_models_per_replica=MULTIPLEX_SLOTS)
    async def adapter_set(self, set_id: str) -> str:
        # A routing marker only: adapters are fetched, kept and evicted by the replica's own
        # tiers with explicit methods (Ray may call a model's __del__ twice on eviction).
        return set_id

    async def generate(self, task: GenerationTask):
        await self.adapter_set(serve.get_multiplexed_model_id() or task.set_id)
        return await self.replica.generate_async(task)

    async def health(self) -> dict:
        return self.replica.health()


@serve.deployment(name=GATEWAY_NAME)
@serve.ingress()
class GatewayDeployment:
    def __init__(self, settings: dict, generator):
        self.settings = ServeSettings(**settings)
        self.registry = AdapterRegistry(self.settings.registry)
        self.service = GenerationService(self.settings, RayGeneratorBackend(generator), self.registry)
        if (in_force := ingress_in_force()) is not self.settings.ingress:
            logger.warning("ingress %s is set, but this Ray cluster was started with %s: set its environment "
                           "(lorafleet.serve.ingress.ray_serve_environment) where Ray starts",
                           self.settings.ingress.value, in_force.value)
        freeze_start_up_heap()

    def __serve_build_asgi_app__(self):
        return create_api(self.service, TokenTable.from_settings(self.settings),
                          training_service(self.settings, self.registry))


def generator_options(settings: ServeSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.replica_num_cpus, "num_gpus": settings.replica_num_gpus},
        "max_ongoing_requests": settings.max_ongoing_requests + settings.cut_in_places,
        "max_queued_requests": settings.max_queued_requests,
        "request_router_config": {"request_router_class": ROUTER_CLASS,
                                  "request_router_kwargs": {"cut_in_places": settings.cut_in_places}},
    }
    if settings.autoscaling:
        scaling = settings.autoscaling
        options["autoscaling_config"] = scaling.model_dump()
    else:
        options["num_replicas"] = settings.replicas
    return options


HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives the head node one unit of it


def gateway_options(settings: ServeSettings) -> dict[str, Any]:
    """The gateway takes no CPU; on the head node by default, which lives as long as the cluster.

    The ingress (HAProxy or Ray's proxy) answers a request in flight on a lost gateway replica with a
    bare 5xx; a lost generator replica is the gateway's to answer (503 with Retry-After). So a
    worker node scaled away or preempted should hold generators only.
    """
    actor: dict[str, Any] = {"num_cpus": 0}
    if settings.gateway_on_head:
        actor["resources"] = {HEAD_NODE_RESOURCE: 0.001}
    return {"ray_actor_options": actor, "max_ongoing_requests": 1000}


def build_app(settings: ServeSettings):
    """The bound Serve application for ``settings``."""
    payload = settings.model_dump(mode="json", exclude={"config_file"})
    generator = GeneratorDeployment.options(**generator_options(settings)).bind(payload)
    gateway = GatewayDeployment.options(**gateway_options(settings))
    return gateway.bind(payload, generator)


def app_builder(args: dict[str, Any] | None = None):
    """Entry point for `serve build` / `serve run` / RayService: ``args`` are ServeSettings fields."""
    return build_app(ServeSettings(**(args or {})))
