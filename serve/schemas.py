"""The HTTP API's request and response bodies (pydantic; published at /openapi.json)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, create_model, field_validator, model_validator

from lorafleet.families import ModelFamily
from lorafleet.registry.identity import REF_REGEX
from lorafleet.training.service.records import Webhook

from .feedback import VersionFeedback
from .settings import RequestLimits

OutputFormat = Literal["png", "jpeg", "webp", "npy"]
# Not blank: some character other than ASCII whitespace (the same in JSON Schema, pydantic and re).
NOT_BLANK = r"[^ \t\n\r\f\v]"
_CLOSED = ConfigDict(extra="forbid", allow_inf_nan=False)


def _json_number(value):
    """JSON Schema's numbers: 3 and 3.0 are integers, but true and "3" are no numbers."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError("must be a JSON number")
    return value


def json_numbers(*fields: str):
    """A before-validator for ``fields`` refusing what pydantic's lax mode would coerce to a number."""
    return field_validator(*fields, mode="before")(lambda cls, value: _json_number(value))


class AdapterWeight(BaseModel):
    model_config = _CLOSED

    ref: str = Field(max_length=200, pattern=REF_REGEX, description="NAME, NAME@7, NAME:alias or NAME@sha256:HEX")
    weight: float = Field(1.0, ge=-8.0, le=8.0, description="Strength of this adapter.")

    _numbers = json_numbers("weight")


class GenerateRequest(BaseModel):
    """A generation request. The limits in the published schema are the server's configured ones
    (``request_models``), so every request the schema allows is one the server accepts."""

    model_config = ConfigDict(**_CLOSED, json_schema_extra={"not": {"required": ["adapter", "adapters"]}})

    prompt: str = Field(min_length=1, pattern=NOT_BLANK, description="Text prompt (not blank).")
    negative_prompt: str | None = Field(None, description="What to steer away from.")
    adapters: list[AdapterWeight] | None = Field(None, description="Adapters with weights (the same adapter twice "
                                                                     "adds its weights).")
    adapter: str | None = Field(None, max_length=200, pattern=REF_REGEX, description="One adapter ref (weight 1).")
    steps: int | None = Field(None, ge=1, description="Denoising steps (default from settings).")
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0, description="Guidance scale: classifier-free "
                                         "guidance (UNet families), the guidance embedding (Flux-dev). Default: the "
                                         "server's, else the base's family's.")
    true_cfg_scale: float | None = Field(None, ge=1.0, le=50.0, description="Families with a guidance embedding "
                                         "(Flux): classic CFG with the negative prompt, as a second pass per step "
                                         "(on above 1 with a negative prompt). Refused for other families.")
    width: int | None = Field(None, ge=8, description="Image width in pixels.")
    height: int | None = Field(None, ge=8, description="Image height in pixels.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Seed; image i uses seed + i.")
    num_images: int = Field(1, ge=1, description="Images to generate for this prompt.")
    output_format: OutputFormat = Field("png", description="png, jpeg, webp, or npy (float32 array, exact).")
    cache: StrictBool = Field(True, description="A seeded request may be answered from the output cache (false: always "
                        "generate, and do not store).")
    user: str | None = Field(None, max_length=256, description="Your end user's id (or the X-Lorafleet-User header): "
                             "an alias split into a canary serves one user one version.")
    run_async: StrictBool = Field(False, alias="async", description="Answer 202 with a job id at once (also: header "
                                  "Prefer: respond-async); poll GET /v1/jobs/{id}.")
    webhook: Webhook | None = Field(None, description="Async only: POSTed the job when it ends (signed as the "
                                    "training webhooks are).")

    _numbers = json_numbers("steps", "guidance_scale", "true_cfg_scale", "width", "height", "seed", "num_images")

    @model_validator(mode="after")
    def _one_way_to_name_adapters(self) -> "GenerateRequest":
        if {"adapter", "adapters"} <= self.model_fields_set:
            raise ValueError("give either 'adapter' or 'adapters', not both")
        return self

    def adapter_weights(self) -> list[AdapterWeight]:
        if self.adapter is not None:
            return [AdapterWeight(ref=self.adapter, weight=1.0)]
        return list(self.adapters or [])


class ResolvedAdapter(BaseModel):
    ref: str
    name: str
    version: int
    digest: str
    weight: float


class Timings(BaseModel):
    queue_ms: float = Field(description="Waiting for a replica and the pipeline.")
    adapter_load_ms: float = Field(description="Fetching and activating adapters.")
    generation_ms: float = Field(description="Running the pipeline (the whole pass this request shared).")
    total_ms: float
    batch_images: int = Field(1, description="Images in the pipeline pass this request shared.")
    adapter_mode: str = Field("base", description="How the pass applied adapters: base, active, fused or mixed "
                              "(cache: answered from the output cache).")
    cut_in: bool = Field(False, description="The pass ran between two denoising steps of another tenant's pass "
                         "instead of waiting for it to end.")
    breakdown: dict[str, float] = Field(default_factory=dict, description="Milliseconds per hand-off inside the "
                                        "server: checks, resolve, output_cache, backend (the call to a replica, Ray "
                                        "included), replica (inside it: fetch, wait for a pass, the pass), "
                                        "replica_wait, encode. The client's own total minus total_ms is HTTP.")


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="Base64-encoded images in output_format.")
    output_format: OutputFormat
    width: int
    height: int
    adapters: list[ResolvedAdapter]
    seed: int
    seeds: list[int]
    timings: Timings
    replica: str | None = Field(None, description="The replica that generated the images (admin scope only).")
    cache: Literal["hit", "miss"] = Field("miss", description="hit: answered from the output cache (also in the "
                                          "X-Cache header); miss: generated.")
    etag: str | None = Field(None, description="The output's key (also the ETag header): equal for requests that "
                             "give the same bytes; seeded requests only.")
    request_id: str | None = Field(None, description="Rate this result with POST /v1/feedback (also the "
                                   "X-Request-Id header).")


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class OpenAIImageRequest(BaseModel):
    """OpenAI's images/generations body; fields lorafleet does not use are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = Field(min_length=1, pattern=NOT_BLANK)
    model: str | None = Field("base", max_length=200, pattern=REF_REGEX,
                              description="An adapter ref, or 'base' for no adapter.")
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="'WIDTHxHEIGHT', a square size the server allows.")
    response_format: Literal["b64_json"] | None = "b64_json"
    quality: str | None = None
    style: str | None = None
    user: str | None = Field(None, max_length=256, description="Keeps an end user on one version of a canary split.")

    _numbers = json_numbers("n")


def size_multiple(limits: RequestLimits, family: ModelFamily) -> int:
    """Sides are multiples of both the configured multiple and the family's (Flux, SD 3: 16)."""
    return math.lcm(limits.size_multiple, family.size_multiple)


def allowed_square_sizes(limits: RequestLimits, family: ModelFamily) -> list[str]:
    multiple = size_multiple(limits, family)
    first = -(-limits.min_size // multiple) * multiple
    return [f"{n}x{n}" for n in range(first, limits.max_size + 1, multiple)]


@dataclass(frozen=True)
class RequestModels:
    generate: type[GenerateRequest]
    openai_images: type[OpenAIImageRequest]
    job: type[GenerateRequest]  # POST /v1/jobs: always async, up to async_max_images


def request_models(limits: RequestLimits, family: ModelFamily, async_max_images: int | None = None) -> RequestModels:
    """The request bodies with the configured limits and the base's family's in their schema (what
    /openapi.json shows): sizes, and true_cfg_scale only where the family offers it."""
    size = {"ge": limits.min_size, "le": limits.max_size, "multiple_of": size_multiple(limits, family)}
    prompt = {"max_length": limits.max_prompt_chars}
    only_without_true_cfg = {} if family.offers_true_cfg else {"true_cfg_scale": {"le": 1.0}}
    common = {"prompt": prompt, "negative_prompt": prompt, "width": size, "height": size,
              "steps": {"le": limits.max_steps}, "adapters": {"max_length": limits.max_adapters_per_request},
              **only_without_true_cfg}
    generate = _narrowed(GenerateRequest, num_images={"le": limits.max_num_images}, **common)
    job = _narrowed(GenerateRequest, num_images={"le": max(limits.max_num_images, async_max_images or 0)},
                    schema_name="AsyncGenerateRequest", **common)
    square_size = Literal[tuple(allowed_square_sizes(limits, family))]  # type: ignore[valid-type]
    openai = _narrowed(OpenAIImageRequest, prompt=prompt, n={"le": limits.max_num_images},
                       retyped={"size": square_size | None})
    return RequestModels(generate, openai, job)


def _narrowed(model: type[BaseModel], retyped: dict | None = None, schema_name: str | None = None,
              **constraints: dict) -> type:
    """A subclass of ``model`` (same name in the schema unless ``schema_name``) whose fields carry extra
    constraints."""
    fields = {}
    for name, extra in constraints.items():
        original = model.model_fields[name]
        fields[name] = (Annotated[original.rebuild_annotation(), Field(**extra)], original)
    for name, annotation in (retyped or {}).items():
        fields[name] = (annotation, model.model_fields[name])
    return create_model(schema_name or model.__name__, __base__=model, __doc__=model.__doc__, **fields)


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class OpenAIImageResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


class AdapterSummary(BaseModel):
    name: str
    latest_version: int | None
    digest: str | None
    aliases: dict[str, int] = Field(default_factory=dict)
    pinned_version: int | None = Field(None, description="The version every replica keeps resident (PUT .../pin).")
    feedback: dict[int, VersionFeedback] = Field(default_factory=dict, description="Users' ratings per version.")
    cached: dict[str, list[str]] = Field(default_factory=dict, description="Tier -> digests cached here.")


class HealthResponse(BaseModel):
    status: str
    base: str | None = None
    family: str | None = None  # the base's model family (lorafleet.families): sd1, sdxl
    base_fingerprint: str | None = None
    registry: str | None = None
    registry_reachable: bool | None = None
    mode: str | None = None
    ingress: str | None = None  # how HTTP reaches the gateway: haproxy, ray-proxy or in-process
