"""The HTTP API (FastAPI). Domain errors become HTTP in one handler, via errors_http.STATUS_BY_ERROR."""

import asyncio
import logging
import math
import time
from typing import Annotated

from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafleet.errors import LorafleetError
from lorafleet.registry.errors import AdapterNotFound
from lorafleet.registry.identity import ALIAS_REGEX, NAME_REGEX
from lorafleet.registry.layout import PinRecord
from lorafleet.training.service.scheduler import TrainingService

from .async_jobs import JOB_ID_PATTERN, JobAccepted, JobState
from .auth import TokenTable
from .errors import PinBudgetExceeded, ServiceUnavailable
from .errors_http import RETRYABLE_STATUSES, status_for
from .feedback import FeedbackRecorded, StarFeedback, ThumbFeedback
from .http_guard import RequestGuard
from .metrics import CONTENT_TYPE
from .schemas import (
    AdapterSummary,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    OpenAIImage,
    OpenAIImageResponse,
    json_numbers,
    request_models,
)
from .service import BASE_MODEL_NAME, GenerationService, check_limits
from .tenants import TENANT_PATTERN, Caller
from .trainings_api import install_training_routes
from .usage import TenantUsage

ERROR_DESCRIPTIONS = {
    400: "The body could not be read as JSON.",
    401: "No or an unknown bearer token.",
    403: "The token lacks this route's scope.",
    404: "No such adapter, version or alias (or the version is yanked).",
    409: "The alias moved meanwhile (expected_version), is reserved, or the registry is read-only; or the "
         "training already ended.",
    429: "The tenant is over its request or work rate, or its queue is full; retry after `Retry-After` seconds.",
    413: "The request body is over the configured limit (max_body_bytes; dataset uploads: "
         "trainings.max_upload_bytes).",
    422: "The request breaks the schema or a limit; `error.field` names the field.",
    502: "An adapter's stored bytes do not match their digest (never served).",
    503: "Overloaded, no replica ready, or the registry unreachable; retry after `Retry-After` seconds.",
    504: "Generation did not finish within the request timeout.",
}
USER_HEADER = "X-Lorafleet-User"  # or the body's `user`: which end user (canary stickiness)
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in ERROR_DESCRIPTIONS.items()}
NOT_READY_RESPONSES = {503: ERROR_RESPONSES[503]}
logger = logging.getLogger(__name__)
_BEARER = HTTPBearer(auto_error=False, description="A token with the route's scope (generate, train or admin).")


class AliasMoveRequest(BaseModel):
    """Point the alias at one version (ending any canary split)."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=10**9 - 1)
    expected_version: int | None = Field(None, ge=1, le=10**9 - 1,
                                         description="Move only if the alias points here now.")

    _numbers = json_numbers("version", "expected_version")


class AliasSplitRequest(BaseModel):
    """A canary: the alias serves each version to its share of callers, sticky per caller."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    weights: dict[Annotated[str, Field(pattern=r"^[1-9][0-9]{0,8}$")], Annotated[float, Field(gt=0, le=1)]] = Field(
        min_length=1, max_length=8, description="Version -> share of callers, summing to 1, e.g. {\"4\": 0.9, "
        "\"5\": 0.1}.")
    expected_version: int | None = Field(None, ge=1, le=10**9 - 1,
                                         description="Move only if the alias points here now (its heaviest version).")

    _numbers = json_numbers("expected_version")


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=1, le=10**9 - 1, description="Default: the latest live version.")

    _numbers = json_numbers("version")


class AliasMoved(BaseModel):
    name: str
    alias: str
    version: int
    revision: int
    split: dict[int, float] | None = None


def _error_response(status: int, code: str, message: str, field: str | None, retry_after: int,
                    headers: dict | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if status in RETRYABLE_STATUSES:
        headers["Retry-After"] = str(retry_after)
    body = {"error": {"code": code, "message": message, "field": field}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def _allowed_methods(app: FastAPI, scope: dict) -> list[str]:
    """Every method some route offers at this path (GET /v1/trainings and POST /v1/trainings are two routes)."""
    methods: set[str] = set()
    for route in app.routes:
        if getattr(route, "methods", None) and route.path_regex.match(scope["path"]):
            methods |= set(route.methods)
    return sorted(methods)


def _field_of(location: tuple) -> str:
    parts = [str(p) for p in location if p != "body"]
    text = ""
    for part in parts:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text or "body"


def _install_error_handlers(app: FastAPI, retry_after: int) -> None:
    @app.exception_handler(LorafleetError)
    async def domain_error(request: Request, exc: LorafleetError):
        wait = getattr(exc, "retry_after_s", None)  # a rate limit says when
        return _error_response(status_for(exc), exc.code, exc.message, exc.field,
                               max(1, math.ceil(wait)) if wait else retry_after)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
        message = str(first.get("msg", "invalid request"))
        field = "body" if first.get("type") == "json_invalid" else _field_of(tuple(first.get("loc", ())))
        return _error_response(422, "invalid_request", message, field, retry_after)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        field = "body" if exc.status_code == 400 else None  # FastAPI could not parse the body
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette names the first matching route's methods only
            headers["Allow"] = ", ".join(_allowed_methods(app, request.scope))
        return _error_response(exc.status_code, "http_error", str(exc.detail), field, retry_after, headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):  # a bug: logged whole, answered in JSON
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error_response(500, "internal_error", f"internal error ({type(exc).__name__}); it is logged",
                               None, retry_after)


class RequestMetrics:
    """Counts every request by route and status with its duration: a pure ASGI middleware (FastAPI's
    ``@app.middleware("http")`` runs each request through an extra task and stream, a cost on
    every call)."""

    def __init__(self, app, service: GenerationService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:  # the router put the matched route on the scope
            path = getattr(scope.get("route"), "path", "unmatched")
            self.service.metrics.record_request(path, status, time.perf_counter() - started)


def _parse_size(size: str | None, native: int) -> tuple[int, int]:
    """(width, height) of an OpenAI size (the schema allows only 'NxN' sizes within the limits)."""
    if size is None:
        return native, native
    width, _, height = size.partition("x")
    return int(width), int(height)


def _scope_guards(tokens: TokenTable, scope: str) -> list:
    """The route dependency checking ``scope`` (and declaring bearer auth in the schema), if auth is on."""
    if not tokens.enabled:
        return []

    async def guard(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]) -> None:
        tokens.authorize(request.headers.get("authorization"), scope)

    return [Depends(guard)]


def create_api(service: GenerationService, tokens: TokenTable, trainings: TrainingService | None = None) -> FastAPI:
    # No /docs or /redoc: they load scripts from a CDN. The schema is at /openapi.json (a token).
    app = FastAPI(title="lorafleet", version="0.1.0", docs_url=None, redoc_url=None,
                  description="Generate images with a frozen diffusion base and registry adapters.")
    _install_error_handlers(app, service.settings.retry_after_s)
    upload_limit = service.settings.trainings.max_upload_bytes if service.settings.trainings else None
    app.add_middleware(RequestGuard, tokens=tokens, max_body_bytes=service.settings.max_body_bytes,
                       max_upload_bytes=upload_limit)
    app.add_middleware(RequestMetrics, service=service)  # outermost: counts the guard's refusals too
    generate_scope, admin_scope = _scope_guards(tokens, "generate"), _scope_guards(tokens, "admin")
    _install_generation_routes(app, service, generate_scope)
    _install_adapter_routes(app, service, generate_scope, admin_scope)
    _install_usage_route(app, service, admin_scope)
    _install_feedback_route(app, service, generate_scope)
    install_training_routes(app, trainings, _scope_guards(tokens, "train"), ERROR_RESPONSES,
                            lambda request: _caller(service, request))
    _install_health_routes(app, service)
    app.router.on_shutdown.append(service.metrics.usage.close)  # the last usage reaches the storage
    if trainings is not None:
        trainings.start()
        app.router.on_shutdown.append(trainings.stop)
    return app


def _install_generation_routes(app: FastAPI, service: GenerationService, scope: list) -> None:
    """/v1/generate and the OpenAI-compatible route, with the configured limits in their schemas."""
    models = request_models(service.settings.limits, service.family, service.settings.async_jobs.max_num_images)
    GenerateBody, OpenAIBody, JobBody = models.generate, models.openai_images, models.job  # noqa: N806 (classes)

    @app.post("/v1/generate", response_model=GenerateResponse, dependencies=scope,
              responses={**ERROR_RESPONSES, 202: {"model": JobAccepted, "description": "Async: the job's id "
                                                  "(\"async\": true or Prefer: respond-async)."}})
    async def generate(body: GenerateBody, request: Request, http_response: Response):
        if body.run_async or "respond-async" in request.headers.get("prefer", "").lower():
            return await _accept(body, request)
        response = await service.generate(body, _caller(service, request), request.headers.get(USER_HEADER))
        if "admin" not in _scopes(request):
            response.replica = None  # host:pid only for admins
        http_response.headers["X-Cache"] = response.cache
        if response.request_id:
            http_response.headers["X-Request-Id"] = response.request_id
        if response.etag:
            http_response.headers["ETag"] = response.etag
        return response

    async def _accept(body: GenerateRequest, request: Request) -> JSONResponse:
        caller, user = _caller(service, request), request.headers.get(USER_HEADER)
        await service.ensure_base_info()
        check_limits(body, service.settings.limits, service.native_size, service.family,
                     max_num_images=service.settings.async_jobs.max_num_images)  # 422 now, not in the job
        job = await asyncio.to_thread(service.jobs.create, caller.tenant, body.webhook)
        service.jobs.start(job.id, lambda: service.generate(body, caller, user, async_job=True))
        accepted = JobAccepted(id=job.id, state=job.state, url=f"/v1/jobs/{job.id}")
        return JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": accepted.url})

    @app.post("/v1/jobs", status_code=202, response_model=JobAccepted, responses=ERROR_RESPONSES,
              dependencies=scope)
    async def submit_job(body: JobBody, request: Request):
        """Always asynchronous, with the larger async_jobs.max_num_images."""
        return await _accept(body, request)

    @app.get("/v1/jobs/{job_id}", response_model=JobState, responses=ERROR_RESPONSES, dependencies=scope)
    async def show_job(request: Request, job_id: str = Path(pattern=f"^{JOB_ID_PATTERN}$")) -> JobState:
        return await asyncio.to_thread(service.jobs.get, job_id, _caller(service, request).tenant)

    @app.post("/v1/images/generations", response_model=OpenAIImageResponse, responses=ERROR_RESPONSES,
              dependencies=scope)
    async def openai_images(body: OpenAIBody, http_request: Request):
        width, height = _parse_size(body.size, service.native_size)
        model = body.model or BASE_MODEL_NAME
        request = GenerateBody(prompt=body.prompt, adapter=None if model == BASE_MODEL_NAME else model,
                               num_images=body.n, width=width, height=height)
        result = await service.generate(request, _caller(service, http_request),
                                        body.user or http_request.headers.get(USER_HEADER))
        return OpenAIImageResponse(created=int(time.time()), data=[OpenAIImage(b64_json=b) for b in result.images])


def _install_adapter_routes(app: FastAPI, service: GenerationService, generate_scope: list, admin_scope: list) -> None:
    adapter_name = Path(pattern=f"^{NAME_REGEX}$", max_length=64)

    @app.get("/v1/adapters", response_model=list[AdapterSummary], responses=ERROR_RESPONSES,
             dependencies=generate_scope)
    async def list_adapters(request: Request):
        listing = await asyncio.to_thread(service.registry.listing)
        for problem in listing.skipped:  # one unreadable manifest must not hide the others
            logger.warning("GET /v1/adapters skipped an unreadable version: %s", problem)
        caller = _caller(service, request)
        pins = {pin.name: pin.version for pin in await asyncio.to_thread(service.registry.pins)}
        return [_summary(service, m.name, m, pinned=pins.get(m.name)) for m in listing.manifests
                if caller.sees(m.name)]

    @app.get("/v1/adapters/{name}", response_model=AdapterSummary, responses=ERROR_RESPONSES,
             dependencies=generate_scope)
    async def show_adapter(request: Request, name: str = adapter_name):
        _visible(service, request, name)
        versions = await asyncio.to_thread(service.registry.list, name)
        aliases = await asyncio.to_thread(service.registry.aliases, name)
        live = [m for m in versions if not m.yanked]
        pins = {pin.name: pin.version for pin in await asyncio.to_thread(service.registry.pins)}
        summary = _summary(service, name, live[-1] if live else None, aliases, pins.get(name))
        if service.feedback is not None:
            summary.feedback = await asyncio.to_thread(service.feedback.by_version, name)
        return summary

    @app.put("/v1/adapters/{name}/pin", response_model=PinRecord, responses=ERROR_RESPONSES,
             dependencies=admin_scope)
    async def pin_adapter(body: PinRequest, request: Request, name: str = adapter_name) -> PinRecord:
        """Keep a version resident on every replica (host tier) across evictions, within cache.pinned_bytes."""
        _visible(service, request, name)
        return await asyncio.to_thread(_pin, service, name, body.version)

    @app.delete("/v1/adapters/{name}/pin", status_code=204, response_class=Response, responses=ERROR_RESPONSES,
                dependencies=admin_scope)
    async def unpin_adapter(request: Request, name: str = adapter_name) -> Response:
        _visible(service, request, name)
        if not await asyncio.to_thread(service.registry.unpin, name):
            raise AdapterNotFound(f"{name} is not pinned", field="name")
        return Response(status_code=204)

    @app.put("/v1/adapters/{name}/aliases/{alias}", response_model=AliasMoved, responses=ERROR_RESPONSES,
             dependencies=admin_scope)
    async def move_alias(body: AliasMoveRequest | AliasSplitRequest, request: Request, name: str = adapter_name,
                         alias: str = Path(pattern=f"^{ALIAS_REGEX}$", max_length=32)):
        _visible(service, request, name)
        if isinstance(body, AliasSplitRequest):
            weights = {int(version): weight for version, weight in body.weights.items()}
            record = await asyncio.to_thread(service.registry.split_alias, name, alias, weights,
                                             expected_version=body.expected_version)
        else:
            record = await asyncio.to_thread(service.registry.set_alias, name, alias, body.version,
                                             expected_version=body.expected_version)
        return AliasMoved(name=name, alias=alias, version=record.version, revision=record.revision,
                          split=record.split)


def _install_feedback_route(app: FastAPI, service: GenerationService, generate_scope: list) -> None:
    @app.post("/v1/feedback", response_model=FeedbackRecorded, responses=ERROR_RESPONSES,
              dependencies=generate_scope)
    async def feedback(body: StarFeedback | ThumbFeedback, request: Request) -> FeedbackRecorded:
        """Rate a generate response by its request_id (again: the rating is replaced)."""
        if service.feedback is None:
            raise ServiceUnavailable("feedback is off on this server (feedback.enabled)")
        rated = await asyncio.to_thread(service.feedback.rate, body, _caller(service, request).tenant)
        kind = "stars" if isinstance(body, StarFeedback) else body.thumb
        for name, version in rated.adapters:
            service.metrics.feedback.labels(name, str(version), kind).inc()
        return FeedbackRecorded(request_id=body.request_id, adapters=[f"{n}@{v}" for n, v in rated.adapters],
                                updated=rated.updated)


def _install_usage_route(app: FastAPI, service: GenerationService, admin_scope: list) -> None:
    @app.get("/v1/usage", response_model=list[TenantUsage], responses=ERROR_RESPONSES, dependencies=admin_scope)
    async def usage(request: Request, tenant: Annotated[str | None, Query(pattern=TENANT_PATTERN)] = None,
                    since: Annotated[float, Query(ge=0, le=1e11, description="Unix seconds.")] = 0.0):
        """Per-tenant usage every gateway served since ``since`` (a tenant's admin sees its own only)."""
        own = _caller(service, request).tenant
        if own is not None and tenant not in (None, own):
            return []
        return await asyncio.to_thread(service.metrics.usage.usage, own or tenant, since)  # reads storage


def _install_health_routes(app: FastAPI, service: GenerationService) -> None:
    """Liveness and readiness are open (status only for anonymous callers); /metrics needs the
    `metrics` scope when auth is on (RequestGuard)."""

    @app.get("/healthz", response_model=HealthResponse, response_model_exclude_none=True)
    async def healthz():
        return HealthResponse(status="ok")

    @app.get("/readyz", response_model=HealthResponse, response_model_exclude_none=True,
             responses=NOT_READY_RESPONSES)
    async def readyz(request: Request):
        readiness = HealthResponse(**await service.readiness())
        if not {"admin", "metrics"} & _scopes(request):
            return HealthResponse(status=readiness.status)  # no registry URI or base for anonymous callers
        return readiness

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition."}})
    async def metrics():
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)


def _scopes(request: Request) -> frozenset[str]:
    """What RequestGuard found the caller may do."""
    return getattr(request.state, "scopes", frozenset())


def _caller(service: GenerationService, request: Request) -> Caller:
    """Who RequestGuard found is calling: a tenant (with its namespaces) or an operator."""
    return service.tenants.caller(getattr(request.state, "tenant", None))


def _visible(service: GenerationService, request: Request, name: str) -> None:
    """Another tenant's adapter does not exist for this caller."""
    if not _caller(service, request).sees(name):
        raise AdapterNotFound(f"no adapter named {name!r}", field="name")


def _pin(service: GenerationService, name: str, version: int | None) -> PinRecord:
    registry = service.registry
    manifest = registry.resolve(f"{name}@{version}" if version else name)
    others = sum(pin.size for pin in registry.pins() if pin.name != name)
    budget = service.settings.cache.pinned_budget
    if others + manifest.size > budget:
        raise PinBudgetExceeded(f"pinning {name}@{manifest.version} ({manifest.size} bytes) would keep "
                                f"{others + manifest.size} bytes pinned; cache.pinned_bytes is {budget}",
                                field="version")
    return registry.pin(name, manifest.version)


def _summary(service: GenerationService, name: str, manifest, aliases: dict | None = None,
             pinned: int | None = None) -> AdapterSummary:
    cached = service.cached_tiers(manifest.digest) if manifest else {}
    return AdapterSummary(name=name, latest_version=manifest.version if manifest else None,
                          digest=manifest.digest if manifest else None, aliases=aliases or {},
                          pinned_version=pinned, cached=cached)
