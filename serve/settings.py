"""Serving settings: defaults < YAML file (--config) < LORAFLEET_* environment < command-line flags."""

from __future__ import annotations

import ipaddress
import re
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from lorafleet.training.service.outbound import OutboundTargets
from lorafleet.training.service.scheduler import TrainingServiceSettings

from .async_jobs import AsyncJobSettings
from .auth import configured_tokens
from .errors import RequestInvalid
from .feedback import FeedbackSettings
from .ingress import DEFAULT_INGRESS, Ingress
from .tenants import TENANT_PATTERN, TenantSettings
from .usage import UsageSettings


class RequestLimits(BaseModel):
    """Bounds on what one request may ask for (violations answer 422 naming the field).

    Each default lies within its bounds: a request that names nothing must be one the server
    accepts (checked at start-up, naming both keys)."""

    model_config = ConfigDict(allow_inf_nan=False)

    max_steps: int = Field(50, ge=1, description="Most denoising steps per request.")
    default_steps: int = Field(20, ge=1, description="Steps when the request names none.")
    default_guidance_scale: float | None = Field(None, ge=0, le=50, description="Guidance when the request names "
                                                 "none (the request schema allows 0-50); unset: the base's family's "
                                                 "own default (SD 1.x 7.5, SDXL 5, Flux 3.5, SD 3.5 7).")
    min_size: int = Field(8, ge=8, description="Smallest width/height in pixels.")
    max_size: int = Field(1024, ge=8, description="Largest width/height in pixels.")
    size_multiple: int = Field(8, ge=1, description="Width and height must be multiples of this and of the base's "
                               "family's own (8; Flux and SD 3: 16); the published schema says the combined one.")
    max_num_images: int = Field(4, ge=1, description="Most images per request.")
    max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt (and negative prompt), in characters.")
    max_adapters_per_request: int = Field(4, ge=0, description="Most adapters in one request.")

    @model_validator(mode="after")
    def _defaults_within_bounds(self) -> "RequestLimits":
        if self.default_steps > self.max_steps:
            raise ValueError(f"limits.default_steps ({self.default_steps}) is above limits.max_steps "
                             f"({self.max_steps}): a request naming no steps would be refused")
        if self.min_size > self.max_size:
            raise ValueError(f"limits.min_size ({self.min_size}) is above limits.max_size ({self.max_size})")
        first = -(-self.min_size // self.size_multiple) * self.size_multiple
        if first > self.max_size:
            raise ValueError(f"limits.size_multiple ({self.size_multiple}) leaves no size between limits.min_size "
                             f"({self.min_size}) and limits.max_size ({self.max_size})")
        return self


class CacheBudgets(BaseModel):
    """Per-replica adapter cache tiers, each with LRU eviction."""

    active_max_adapters: int = Field(8, ge=1, description="Adapters kept loaded in the pipeline.")
    active_bytes: int = Field(1024**3, ge=0, description="Active tier byte budget (adapter weights).")
    host_bytes: int = Field(512 * 1024**2, description="Host-memory tier (state dicts) byte budget.")
    disk_bytes: int = Field(4 * 1024**3, description="Local disk tier byte budget.")
    disk_dir: Path = Field(Path("~/.cache/lorafleet/adapters"), description="Local disk tier directory.")
    pinned_bytes: int | None = Field(None, ge=0, description="Most bytes of adapters pinned (PUT "
                                     "/v1/adapters/NAME/pin) across names, kept in the host tier, whose budget must "
                                     "hold them (default: half of host_bytes).")
    pin_refresh_s: float = Field(5.0, gt=0, le=3600, description="How often a replica reads the pins.")

    @property
    def pinned_budget(self) -> int:
        return self.pinned_bytes if self.pinned_bytes is not None else self.host_bytes // 2

    @model_validator(mode="after")
    def _pins_fit_the_host_tier(self) -> "CacheBudgets":
        if self.pinned_bytes is not None and self.pinned_bytes > self.host_bytes:
            raise ValueError(f"cache.pinned_bytes ({self.pinned_bytes}) is above cache.host_bytes ({self.host_bytes}):"
                             " pinned adapters live in the host tier")
        return self


class OutputCacheSettings(BaseModel):
    """Finished outputs of seeded requests (serve/output_cache.py): repeats answered without generating."""

    enabled: bool = Field(True, description="Answer a seeded repeat from the cache (a request may say cache: false).")
    memory_bytes: int = Field(256 * 1024**2, ge=0, description="Gateway memory tier budget (encoded images).")
    shared_uri: str | None = Field(None, description="Shared tier in object storage (file://, s3://), e.g. the "
                                   "registry's bucket; off when unset.")
    shared_ttl_s: float = Field(86_400.0, gt=0, description="Shared entries older than this are ignored and removed.")
    shared_bytes: int = Field(10 * 1024**3, ge=0, description="Shared tier byte budget (oldest removed beyond it).")
    recheck_s: float = Field(5.0, ge=0, description="How old a 'not yanked' check of a cached output's adapter "
                             "versions may be.")


class Batching(BaseModel):
    """How a replica groups concurrent requests into pipeline passes (serve/batching.py)."""

    max_batch_images: int = Field(8, ge=1, description="Most images in one pipeline pass.")
    wait_ms: float = Field(5.0, ge=0, le=1000, description="How long, right after a pass, the next one waits for "
                           "that pass's callers to come back (serve/batching.py).")
    wait_pass_share: float = Field(0.2, ge=0, le=1, description="Or, if longer, this share of that pass's own "
                                   "time: a caller back later than the window waits a whole pass (0: wait_ms only).")
    row_weights_bytes: int | None = Field(None, ge=0, description="Memory for per-image merged weights of small "
                                          "layers in a mixed pass (default: 64 MiB on CPU, 0 on CUDA).")


class Hotswap(BaseModel):
    """A compile-safe adapter slot (serve/slots.py): for a torch.compile'd denoiser on CUDA."""

    target_rank: int = Field(64, ge=1, le=1024, description="Largest total rank of an adapter set served.")
    compile: bool = Field(True, description="torch.compile the denoiser (UNet or transformer) once the slot exists.")


class Autoscaling(BaseModel):
    """Ray Serve autoscaling of generator replicas (passed to the deployment's autoscaling_config)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _min_within_max(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.min_replicas ({self.min_replicas}) is above autoscaling.max_replicas "
                             f"({self.max_replicas})")
        return self
    target_ongoing_requests: float = Field(2.0, gt=0, description="Requests per replica to aim for.")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    metrics_interval_s: float = Field(2.0, gt=0, description="How often replicas report their load.")
    look_back_period_s: float = Field(10.0, gt=0, description="Window the load is averaged over.")


class ProxyLocation(str, Enum):
    """Where Ray Serve runs its HTTP proxies (Ray's own names)."""

    every_node = "EveryNode"  # a load balancer in front of every node (KubeRay's serve Service)
    head_only = "HeadOnly"  # one entry point; also for several raylets on one machine sharing a port


class ServeSettings(BaseSettings):
    """Everything `lorafleet serve` and the Serve app read (env prefix LORAFLEET_, nested with __)."""

    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", env_nested_delimiter="__", extra="forbid")

    base: str = Field("toy", description="Built-in base name (toy, tiny, small), a diffusers directory or a "
                                         ".safetensors file.")
    base_config: str | None = Field(None, description="Diffusers directory with a single-file checkpoint's configs.")
    registry: str | None = Field(None, description="Registry URI (default $LORAFLEET_REGISTRY, else ~/.lorafleet).")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    proxy_location: ProxyLocation = Field(ProxyLocation.every_node, description="Where Ray Serve's HTTP proxies "
                                          "run: EveryNode or HeadOnly.")
    ingress: Ingress = Field(DEFAULT_INGRESS, description="How HTTP reaches the gateway on Ray Serve: haproxy "
                             "(Ray Serve's direct ingress behind HAProxy, throughput-optimized) or ray-proxy (Ray "
                             "Serve's Python proxy). A switch of the whole Ray cluster: applied to a cluster "
                             "lorafleet starts; a cluster started elsewhere needs the environment in "
                             "k8s/base/rayservice.yaml.")
    ingress_drain_s: float = Field(2.0, ge=0, le=300, description="How long a stopping gateway replica keeps "
                                   "answering (haproxy ingress) so HAProxy takes it out of rotation first.")
    gateway_on_head: bool = Field(True, description="Run the gateway on the Ray head node (worker nodes that "
                                  "scale away or are preempted then hold generator replicas only).")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")
    dtype: str = Field("auto", pattern="^(auto|float32|float16|bfloat16)$")
    replicas: int = Field(1, ge=1, description="Generator replicas when autoscaling is off.")
    autoscaling: Autoscaling | None = Field(None, description="Ray Serve autoscaling of generator replicas.")
    replica_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per generator replica.")
    replica_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per generator replica.")
    max_ongoing_requests: int = Field(8, ge=1,
                                      description="Requests a generator replica holds at once (batched into passes).")
    max_queued_requests: int = Field(16, ge=1, description="Requests waiting per caller before 503.")
    request_timeout_s: float = Field(120.0, gt=0, description="A request still running after this gets 504.")
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 503.")
    resolution_ttl_s: float = Field(5.0, ge=0, description="How long an alias resolution is reused.")
    fuse_after: int = Field(0, ge=0, description="Fuse an adapter set served this many times in a row (0: never).")
    prewarm: list[str] = Field(default_factory=list, max_length=256, description="Adapter refs every replica loads "
                               "(host tier, and the device tier through one 1-step pass if they fit) before it is "
                               "ready, at start and after every scale-up; pinned adapters are loaded too.")
    cache: CacheBudgets = Field(default_factory=CacheBudgets)
    output_cache: OutputCacheSettings = Field(default_factory=OutputCacheSettings)
    batching: Batching = Field(default_factory=Batching)
    hotswap: Hotswap | None = Field(None, description="Serve through one compile-safe slot (off: batch mixed sets).")
    limits: RequestLimits = Field(default_factory=RequestLimits)
    tenants: dict[str, TenantSettings] = Field(default_factory=dict, description="Tenants by name: their "
                                               "adapter namespaces, rate limits and queue shares (serve/tenants.py)."
                                               " A token joins one with '@tenant'.")
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings, description="User ratings per adapter "
                                       "version (POST /v1/feedback).")
    async_jobs: AsyncJobSettings = Field(default_factory=AsyncJobSettings, description="Asynchronous generation "
                                         "(\"async\": true, or POST /v1/jobs).")
    trainings: TrainingServiceSettings | None = Field(None, description="REST trainings run as Ray jobs (scope "
                                                      "`train`); off when unset.")
    usage: UsageSettings = Field(default_factory=UsageSettings, description="Per-tenant usage (GET /v1/usage), "
                                 "kept in the registry's storage.")
    webhooks: OutboundTargets = Field(default_factory=OutboundTargets, description="Where callers' webhooks and "
                                      "MLflow servers may be: public addresses, plus the hosts and networks allowed "
                                      "here.")
    auth_enabled: bool = Field(False, description="Require bearer tokens (on whenever tokens are configured).")
    insecure_no_auth: bool = Field(False, description="Allow listening on a non-loopback address with auth off "
                                   "(--insecure-no-auth): anyone who reaches the port is admin.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest request body (JSON routes); 413 above.")
    api_tokens: str | None = Field(None, description="'token=scope+scope,token2=generate' (or use tokens_file).")
    tokens_file: Path | None = Field(None, description="File with one 'token scope,scope' per line.")
    config_file: Path | None = Field(None, description="YAML file these settings were read from.")

    @property
    def cut_in_places(self) -> int:
        """Places a generator replica holds beyond ``max_ongoing_requests``: one per lane (the
        tenants and the operator), for a lane's first request to run between two steps of another
        lane's pass (serve/batching.py). 0 without tenants: one queue, nothing cuts in."""
        return len(self.tenants) + 1 if self.tenants else 0

    @property
    def auth_required(self) -> bool:
        """Auth is on when asked for, and whenever tokens exist (it never fails open)."""
        return self.auth_enabled or bool(self.api_tokens) or self.tokens_file is not None

    @model_validator(mode="after")
    def _safe_to_listen(self) -> "ServeSettings":
        tokens = configured_tokens(self)  # refuses weak or placeholder tokens at start-up
        for name in self.tenants:
            if not re.fullmatch(TENANT_PATTERN, name):
                raise ValueError(f"tenants: {name!r} is not a tenant name (lowercase letters, digits, - and _)")
        unknown = sorted({e.tenant for e in tokens if e.tenant and e.tenant not in self.tenants})
        if unknown:
            raise ValueError(f"api_tokens: tokens name tenants that are not configured: {unknown} (tenants: "
                             f"{sorted(self.tenants) or 'none'})")
        if not self.auth_required and not self.insecure_no_auth and not is_loopback(self.host):
            raise ValueError(f"host {self.host!r} is not a loopback address and auth is off: configure tokens "
                             "(api_tokens / tokens_file) or pass --insecure-no-auth (insecure_no_auth: true)")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = init_settings.init_kwargs.get("config_file") if hasattr(init_settings, "init_kwargs") else None
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _field_of(error: dict) -> str:
    """The settings key an error names: its location, or the key a cross-field check names first."""
    field = ".".join(str(p) for p in error["loc"])
    named = re.match(r"^([a-z_]+(?:\.[a-z_]+)?)[ :]", _message(error))
    if not field and named and named.group(1).split(".")[0] in ServeSettings.model_fields:
        return named.group(1)
    if field.count(".") == 0 and named and named.group(1).startswith(field + "."):
        return named.group(1)  # a nested model's cross-field check: limits -> limits.default_steps
    return field or "settings"


def _message(error: dict) -> str:
    return str(error.get("msg", "")).removeprefix("Value error, ")


def load_settings(config_file: Path | None = None, **overrides: Any) -> ServeSettings:
    """Settings from a YAML file, the environment and explicit overrides (None values ignored)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if config_file is not None:
        if not Path(config_file).is_file():
            raise RequestInvalid(f"settings file {config_file} does not exist", field="config")
        given["config_file"] = Path(config_file)
    try:
        return ServeSettings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = _field_of(first)
        problems = [f"{_field_of(e)}: {_message(e)}" for e in exc.errors()]
        raise RequestInvalid(f"invalid serve settings: {field}: {_message(first)}", field=field,
                             problems=problems) from exc
