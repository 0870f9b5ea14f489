"""How the gateway reaches generator replicas: in-process (tests, single process) or Ray Serve."""

from __future__ import annotations

# Imports inside functions: Ray only for the Ray backend.
import asyncio

from lorafleet.errors import LorafleetError

from .errors import Overloaded, ServiceUnavailable
from .ingress import IN_PROCESS, ingress_in_force
from .replica import GenerationOutput, GenerationTask, GeneratorReplica


class LocalGeneratorBackend:
    """One in-process replica; at most ``max_ongoing`` generations at once, ``max_queued`` waiting."""

    def __init__(self, replica: GeneratorReplica, max_ongoing: int = 1, max_queued: int = 16):
        self.replica = replica
        self._slots = asyncio.Semaphore(max_ongoing)
        self._max_waiting = max_ongoing + max_queued
        self._waiting = 0

    async def generate(self, task: GenerationTask) -> GenerationOutput:
        if self._waiting >= self._max_waiting:
            raise Overloaded("the generator queue is full; retry shortly")
        self._waiting += 1
        try:
            async with self._slots:
                return await self.replica.generate_async(task)
        finally:
            self._waiting -= 1

    async def health(self) -> dict:
        return self.replica.health()

    def ingress(self) -> str:
        return IN_PROCESS


class RayGeneratorBackend:
    """Generator replicas behind a Ray Serve handle, routed by adapter set (model multiplexing)."""

    def __init__(self, handle):
        self.handle = handle

    async def generate(self, task: GenerationTask) -> GenerationOutput:
        from ray.exceptions import RayError, RayTaskError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        try:
            return await self.handle.options(multiplexed_model_id=task.set_id).generate.remote(task)
        except BackPressureError as exc:
            raise Overloaded("all generator replicas are busy and their queues are full; retry shortly") from exc
        except RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, LorafleetError):
                raise cause from None
            if _platform_failure(exc.cause):
                raise _unavailable(exc.cause) from exc
            raise
        except (RayError, DeploymentUnavailableError) as exc:  # the replica, its worker or its node was lost
            raise _unavailable(exc) from exc

    async def health(self) -> dict:
        return await self.handle.health.remote()

    def ingress(self) -> str:
        return ingress_in_force().value


def _platform_failure(error: BaseException | None) -> bool:
    """A Ray failure of the platform (an actor, worker, node or object lost), not of our code."""
    from ray.exceptions import RayError, RayTaskError

    return isinstance(error, RayError) and not isinstance(error, RayTaskError)


def _unavailable(error: BaseException) -> ServiceUnavailable:
    return ServiceUnavailable(f"generator replica unavailable: {type(error).__name__}; retry shortly")
