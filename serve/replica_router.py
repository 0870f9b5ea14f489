"""Which generator replica a request goes to: Ray Serve's request router for our deployment.

Ray's default router (power of two choices with model multiplexing) keeps sending an adapter set
to the replicas that hold it until they are full, and then waits 1–2 s
(``RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S``, with backoff) for one of them before it
tries a replica that does not hold it. That suits models that take seconds to load. A LoRA set
loads in milliseconds, so a flood of one set waited a whole second beside an idle replica, and a
full holder made another tenant's request wait there instead of cutting into a pass elsewhere.

This router prefers the replicas that hold the request's set, but only among replicas with a
place for it, and otherwise goes at once to the least loaded other one. A replica holds
``max_ongoing_requests`` places plus ``cut_in_places`` (serve/settings.py): the extra places are
for a tenant's first request there, which runs between two steps of the pass under way
(serve/batching.py); the others only fill the ordinary places.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .replica import GenerationTask

ROUTER_CLASS = f"{__name__}.AdapterLaneRouter"


@dataclass(frozen=True)
class RoutedRequest:
    """What routing needs of a request: its adapter set and its tenant's lane ("": none)."""

    set_id: str = ""
    lane: str = ""


@dataclass(frozen=True)
class ReplicaLoad:
    replica_id: ReplicaID
    places: int  # max_ongoing_requests, cut-in places included
    ongoing: int
    lanes: frozenset[str]  # lanes with requests in flight there
    sets: frozenset[str]  # adapter sets it holds (its multiplexed markers)


def rank_replicas(replicas: list[ReplicaLoad], request: RoutedRequest, cut_in_places: int) -> list[list[ReplicaID]]:
    """Ranks of replicas to try, best first: the holders of the request's set with a place for it,
    then each other replica with a place, least loaded first. Empty: no replica has a place."""
    open_ = [r for r in replicas if r.ongoing < _limit(r, request, cut_in_places)]
    holders = [r.replica_id for r in open_ if request.set_id and request.set_id in r.sets]
    others = sorted((r for r in open_ if r.replica_id not in holders), key=lambda r: (r.ongoing, len(r.sets)))
    return [ranked for ranked in (holders, *([r.replica_id] for r in others)) if ranked]


def _limit(replica: ReplicaLoad, request: RoutedRequest, cut_in_places: int) -> int:
    """A lane's first request at a replica may take a cut-in place, and so may a call that
    generates nothing (health); any other request only an ordinary place."""
    cuts_in = not request.set_id or (bool(request.lane) and request.lane not in replica.lanes)
    return replica.places if cuts_in else replica.places - cut_in_places


def routed_request(pending: PendingRequest) -> RoutedRequest:
    """The set and lane of a ``generate`` call; a call without a task (health) has neither."""
    task = next((arg for arg in pending.args if isinstance(arg, GenerationTask)), None)
    return RoutedRequest(task.set_id, task.lane) if task is not None else RoutedRequest()


class AdapterLaneRouter(RequestRouter):
    """The Ray side of ``rank_replicas``. A replica's load is Ray's own queue length for it (updated
    as requests are sent and answered, and by the replica's own count). The lanes in flight at each
    replica are this router's: a request is counted from its routing until its result is done."""

    def __init__(self, *args, **kwargs):
        self.cut_in_places = 0
        self._lanes: dict[ReplicaID, Counter[str]] = {}  # requests in flight per replica and lane
        super().__init__(*args, **kwargs)

    def initialize_state(self, cut_in_places: int = 0, **_) -> None:
        """Ray passes the deployment's ``request_router_kwargs`` (serve/app.py generator_options)."""
        self.cut_in_places = cut_in_places

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        request = routed_request(pending_request) if pending_request is not None else RoutedRequest()
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # none free: wait before asking again
        by_id = {replica.replica_id: replica for replica in candidate_replicas}
        ranks = rank_replicas([self._load(replica) for replica in candidate_replicas], request, self.cut_in_places)
        return [[by_id[replica_id] for replica_id in rank] for rank in ranks]

    def _load(self, replica: RunningReplica) -> ReplicaLoad:
        return ReplicaLoad(replica.replica_id, replica.max_ongoing_requests,
                           self.replica_queue_len_cache.get(replica.replica_id) or 0,
                           frozenset(self._lanes.get(replica.replica_id, ())), frozenset(replica.multiplexed_model_ids))

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        """Count the request's lane at ``replica_id`` until its result is done. Its own done-callback,
        not ``on_request_completed``: Ray may call that before this (a quick call's result can be done
        before its acceptance is read), and a count that never goes down would hold places for ever."""
        lane = routed_request(pending_request).lane
        lanes = self._lanes.setdefault(replica_id, Counter())
        lanes[lane] += 1
        loop = self._event_loop
        result.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release, lanes, lane))

    @staticmethod
    def _release(lanes: Counter[str], lane: str) -> None:
        lanes[lane] -= 1
        if lanes[lane] <= 0:
            del lanes[lane]

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        current = {replica.replica_id for replica in replicas}
        self._lanes = {replica_id: lanes for replica_id, lanes in self._lanes.items() if replica_id in current}
