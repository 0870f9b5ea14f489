"""The HTTP API's request and response bodies (pydantic; published at /openapi.json)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

OutputFormat = Literal["png", "jpeg", "webp", "npy"]
_FINITE = ConfigDict(extra="forbid", allow_inf_nan=False)


class AdapterWeight(BaseModel):
    model_config = _FINITE

    ref: str = Field(min_length=1, max_length=200, description="NAME, NAME@7, NAME:alias or NAME@sha256:HEX")
    weight: float = Field(1.0, ge=-8.0, le=8.0, description="Strength of this adapter.")


class GenerateRequest(BaseModel):
    model_config = _FINITE

    prompt: str = Field(description="Text prompt.")
    negative_prompt: str | None = Field(None, description="What to steer away from.")
    adapters: list[AdapterWeight] | None = Field(None, description="Adapters with weights.")
    adapter: str | None = Field(None, min_length=1, max_length=200, description="One adapter ref (weight 1).")
    steps: int | None = Field(None, ge=1, description="Denoising steps (default from settings).")
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0, description="Classifier-free guidance scale.")
    width: int | None = Field(None, ge=8, description="Image width in pixels, a multiple of 8.")
    height: int | None = Field(None, ge=8, description="Image height in pixels, a multiple of 8.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Seed; image i uses seed + i.")
    num_images: int = Field(1, ge=1, description="Images to generate for this prompt.")
    output_format: OutputFormat = Field("png", description="png, jpeg, webp, or npy (float32 array, exact).")

    @model_validator(mode="after")
    def _one_way_to_name_adapters(self) -> "GenerateRequest":
        if self.adapter is not None and self.adapters:
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
    generation_ms: float = Field(description="Running the pipeline.")
    total_ms: float


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="Base64-encoded images in output_format.")
    output_format: OutputFormat
    width: int
    height: int
    adapters: list[ResolvedAdapter]
    seed: int
    seeds: list[int]
    timings: Timings
    replica: str = Field(description="The replica that generated the images.")


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class OpenAIImageRequest(BaseModel):
    """OpenAI's images/generations body; fields lorafleet does not use are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str
    model: str | None = Field("base", description="An adapter ref, or 'base' for no adapter.")
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="'WIDTHxHEIGHT'.")
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    quality: str | None = None
    style: str | None = None
    user: str | None = None


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
    cached: dict[str, list[str]] = Field(default_factory=dict, description="Tier -> digests cached here.")


class HealthResponse(BaseModel):
    status: str
    base: str | None = None
    base_fingerprint: str | None = None
    registry: str | None = None
    registry_reachable: bool | None = None
    mode: str | None = None
