"""How the gateway turns what Ray raises while calling a generator replica into lorafleet errors.

A replica or node lost mid-request is the platform's failure, not the caller's and not a bug:
it must reach the client as 503 with Retry-After (retryable), never as a bare 500. The handle
here is a stand-in for Ray Serve's handle (Ray's part, not ours); the exceptions are Ray's own.
"""

from __future__ import annotations

import asyncio

import pytest
from ray import exceptions as ray_errors
from ray.serve.exceptions import BackPressureError

from lorafleet.serve.backends import RayGeneratorBackend
from lorafleet.serve.errors import Overloaded, RequestInvalid, ServiceUnavailable


class _Handle:
    """Answers ``handle.options(...).generate.remote(task)`` by raising the given error."""

    def __init__(self, error: BaseException):
        self.error = error
        self.generate = self

    def options(self, **_):
        return self

    async def remote(self, task):
        raise self.error


def _raised(error: BaseException) -> BaseException:
    with pytest.raises(Exception) as caught:
        asyncio.run(RayGeneratorBackend(_Handle(error)).generate(_Task()))
    return caught.value


class _Task:
    set_id = "set"


LOST = [
    ray_errors.ActorDiedError(),
    ray_errors.ActorUnavailableError("node gone", None),
    ray_errors.RayActorError(),
    ray_errors.NodeDiedError("node gone"),
    ray_errors.WorkerCrashedError(),
    ray_errors.LocalRayletDiedError(),
    ray_errors.OwnerDiedError("00" * 28, None, "generate"),
    ray_errors.ObjectLostError("00" * 28, None, "generate"),
    ray_errors.RaySystemError("gcs unreachable"),
    ray_errors.TaskCancelledError(),
]


@pytest.mark.parametrize("error", LOST, ids=lambda error: type(error).__name__)
def test_a_lost_replica_or_node_is_503_not_500(error):
    assert isinstance(_raised(error), ServiceUnavailable)


@pytest.mark.parametrize("error", LOST[:5], ids=lambda error: type(error).__name__)
def test_a_lost_actor_wrapped_by_the_replica_call_is_503(error):
    wrapped = ray_errors.RayTaskError("generate", "traceback", error)
    assert isinstance(_raised(wrapped), ServiceUnavailable)


def test_a_full_queue_is_overloaded_and_the_replicas_own_errors_pass_through():
    assert isinstance(_raised(BackPressureError(num_queued_requests=4, max_queued_requests=4)), Overloaded)
    invalid = RequestInvalid("bad prompt", field="prompt")
    passed = _raised(ray_errors.RayTaskError("generate", "traceback", invalid))
    assert isinstance(passed, RequestInvalid) and passed.field == "prompt"


def test_a_bug_in_the_replica_stays_an_internal_error():
    error = _raised(ray_errors.RayTaskError("generate", "traceback", ZeroDivisionError("x")))
    assert not isinstance(error, ServiceUnavailable)
