"""The training configuration: one YAML file validated by pydantic, every field documented.

Fixed, portable keys: ``method``, ``base``, ``data.path``, ``data.resolution``, ``data.trigger``,
``max_steps``, ``seed``, ``lora.rank``, ``lora.alpha``, ``publish.name``. Unknown keys are
refused with their name; any key can be overridden with ``--set dotted.key=value``.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lorafleet.families import ObjectiveOptions

from .errors import TrainingInputInvalid

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class Method(str, Enum):
    lora = "lora"
    dreambooth = "dreambooth"
    qlora = "qlora"
    textual_inversion = "textual_inversion"
    full = "full"


ADAPTER_METHODS = (Method.lora, Method.dreambooth, Method.qlora)  # LoRA layers over a frozen base


class DataConfig(BaseModel):
    model_config = _STRICT

    path: Path = Field(description="Folder of images with NAME.txt captions or a metadata.jsonl.")
    resolution: int = Field(32, ge=8, le=2048, description="Training resolution in pixels (square).")
    trigger: str | None = Field(None, description="Trigger token / rare identifier, e.g. 'sks'.")
    trigger_mode: Literal["prepend", "substitute", "none"] = Field(
        "prepend", description="prepend the trigger to every caption, or substitute it for '[trigger]'.")
    crop: Literal["center", "random"] = Field("center", description="Crop after the aspect-keeping resize.")
    flip: bool = Field(False, description="Random horizontal flips.")
    color_jitter: float = Field(0.0, ge=0, le=0.5, description="Random brightness/contrast change (0 = off).")
    min_size: int = Field(8, ge=1, description="Images smaller than this (short side) are skipped.")
    max_file_bytes: int = Field(50 * 1024**2, ge=1024, description="Image files larger than this are skipped.")
    caption_dropout: float = Field(0.0, ge=0, le=1, description="Share of captions replaced by '' (for CFG).")
    cache_latents: bool = Field(True, description="Encode images once (only without random augmentation).")
    buckets: bool = Field(False, description="Aspect-ratio buckets of about resolution^2 pixels, not square crops.")
    weighted_sampling: bool = Field(True, description="Honour per-image 'weight' values in metadata.jsonl.")

    @property
    def marks_regularization(self) -> bool:
        """Captions without ``[trigger]`` are regularization examples (substitute mode with a trigger)."""
        return bool(self.trigger) and self.trigger_mode == "substitute"


class LoraConfig(BaseModel):
    model_config = _STRICT

    rank: int = Field(4, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(4.0, gt=0, description="lora_alpha; the update is scaled by alpha / rank.")
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
                                      description="UNet module names (suffixes) to adapt.")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    text_encoder: bool = Field(False, description="Also train a LoRA on the text encoder.")
    text_encoder_targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
                                            description="Text-encoder module names (suffixes).")


class DreamBoothConfig(BaseModel):
    model_config = _STRICT

    class_prompt: str = Field("a photo", description="Prompt for the base model's own class images.")
    instance_prompt: str | None = Field(None, description="One prompt for every instance image (e.g. "
                                        "'a photo of sks dog'); default: each image's caption with the trigger.")
    num_class_images: int = Field(8, ge=0, le=10_000, description="Class images generated (and cached).")
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the prior-preservation loss.")
    class_image_steps: int = Field(20, ge=1, le=200, description="Sampling steps for class images.")


class TextualInversionConfig(BaseModel):
    model_config = _STRICT

    token: str = Field("<new>", description="The new token to learn.")
    init_word: str | None = Field(None, description="Existing word whose embedding starts the new one.")
    num_vectors: int = Field(1, ge=1, le=16, description="Embedding vectors for the token.")


class RegularizationConfig(BaseModel):
    """Regularization examples: images in the data folder whose caption does not name the trigger
    (``data.trigger_mode=substitute`` and no ``[trigger]`` in the caption), e.g. renders of what
    the base already draws, kept so that the adapter leaves those prompts alone."""

    model_config = _STRICT

    target: Literal["images", "base"] = Field(
        "images", description="images: their rows learn their own images (kohya-style regularization "
        "images); base: they learn the frozen base model's own prediction for the same noisy input "
        "(the adapter is switched off for it), so the adapter is taught to change nothing there; "
        "DreamBooth's class images too. base needs an adapter method (lora, dreambooth, qlora) and, "
        "but for DreamBooth, data.trigger with data.trigger_mode=substitute.")
    weight: float = Field(1.0, ge=0, le=1000, description="Loss weight of regularization rows (instance rows: 1).")
    share: float | None = Field(None, gt=0, lt=1, description="Expected share of each batch's rows drawn from "
                                "regularization examples, however many there are (DreamBooth's one class image "
                                "per instance image is 0.5); unset: in proportion to their number.")


class OptimizerConfig(BaseModel):
    model_config = _STRICT

    name: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw8bit needs bitsandbytes.")
    learning_rate: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="After warm-up.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")


class FlowMatchingConfig(BaseModel):
    """Flow-matching families (Flux): how training draws sigmas, as the Flux trainers do."""

    model_config = _STRICT

    timestep_sampling: Literal["sigmoid", "logit_normal", "uniform"] = Field(
        "sigmoid", description="sigmoid(scale * N(0,1)) (kohya, SimpleTuner), sigmoid(N(mean, std)) (SD3 paper, "
        "diffusers' logit_normal) or uniform.")
    sigmoid_scale: float = Field(1.0, gt=0, le=10, description="sigmoid sampling: spread.")
    logit_mean: float = Field(0.0, ge=-5, le=5, description="logit_normal sampling: mean.")
    logit_std: float = Field(1.0, gt=0, le=5, description="logit_normal sampling: standard deviation.")
    shift: float = Field(1.0, gt=0, le=100, description="sigma -> shift*sigma/(1+(shift-1)*sigma); 1: none, "
                         "3: kohya's discrete_flow_shift default.")
    dynamic_shift: bool = Field(False, description="Shift as the scheduler does at inference for the image's token "
                                "count (Flux's resolution-dependent mu); overrides shift.")
    guidance_scale: float = Field(1.0, ge=0, le=50, description="Guidance-embedding families: the guidance the "
                                  "transformer is told while training (1: as ai-toolkit trains Flux-dev).")


class TrackingConfig(BaseModel):
    """Where a run's curves and images go besides its output folder (training/tracking.py)."""

    model_config = _STRICT

    tensorboard: bool = Field(True, description="TensorBoard event files in output_dir/tensorboard: loss, learning "
                              "rate, gradient norm (before clipping), validation images.")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (http://..., file:///..., sqlite:///...); "
                                   "the run id goes into the adapter's lineage. Needs the mlflow client "
                                   "(pip install 'lorafleet[tracking]'); MLflow 3 opens a file:// store only with "
                                   "MLFLOW_ALLOW_FILE_STORE=true.")
    mlflow_experiment: str = Field("lorafleet", min_length=1, max_length=256, description="MLflow experiment name.")
    log_every: int = Field(1, ge=1, le=100_000, description="Scalars every N steps.")


class PublishConfig(BaseModel):
    model_config = _STRICT

    name: str | None = Field(None, description="Registry name; nothing is published without one.")
    aliases: list[str] = Field(default_factory=list, description="Aliases moved to the new version.")
    description: str = ""


class TrainConfig(BaseModel):
    """One training run."""

    model_config = _STRICT

    method: Method = Field(Method.lora, description="lora, dreambooth, qlora, textual_inversion or full.")
    base: str = Field("toy", description="Built-in base name (toy, tiny, small, tiny-sdxl, tiny-flux, tiny-sd3), a "
                      "diffusers directory or a single-file checkpoint.")
    base_config: str | None = Field(None, description="Diffusers directory with a single-file base's configs (Flux: "
                                    "its text encoders, VAE and scheduler too).")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    max_steps: int = Field(100, ge=1, le=10_000_000, description="Optimizer steps (see epochs).")
    epochs: float | None = Field(None, gt=0, le=100_000,
                                 description="If set, train this many passes over the data instead of max_steps.")
    batch_size: int = Field(4, ge=1, le=4096)
    gradient_accumulation: int = Field(1, ge=1, le=1024)
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="fp16/bf16 autocast on CUDA only.")
    gradient_checkpointing: bool = False
    min_snr_gamma: float | None = Field(None, gt=0, description="Min-SNR-gamma loss weighting (e.g. 5).")
    noise_offset: float = Field(0.0, ge=0, le=1, description="Offset noise strength.")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of trained weights (e.g. 0.999).")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    validation_prompts: list[str] = Field(default_factory=list, description="Prompts for validation images.")
    validation_every: int = Field(0, ge=0, description="Validation images every N steps (0: at the end).")
    output_dir: Path = Field(Path("lorafleet-runs/run"), description="Checkpoints, samples, metrics.")
    clip_model: Path | None = Field(None, description="Local CLIP folder: adds a CLIP score of the validation images.")
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    dreambooth: DreamBoothConfig = Field(default_factory=DreamBoothConfig)
    textual_inversion: TextualInversionConfig = Field(default_factory=TextualInversionConfig)
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig)
    guided_target_scale: float | None = Field(
        None, gt=1, le=30, description="Train the instance rows so that classifier-free guidance at this scale, "
        "not the conditional prediction alone, reproduces their images: their target becomes u + (target - u) / "
        "scale, u the frozen base's unconditional prediction for the same noisy input. Guidance samples in "
        "proportion to p(x|prompt) (p(x|prompt) / p(x))^(scale - 1), so an adapter meant to set an attribute's "
        "balance (toyworld/correction.py) otherwise comes out divided by the base's unconditional balance. "
        "Needs an adapter method (lora, dreambooth, qlora) and a family guided by classic CFG.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    flow_matching: FlowMatchingConfig = Field(default_factory=FlowMatchingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)

    def objective_options(self) -> ObjectiveOptions:
        """What the base's family needs to build its training objective."""
        flow = self.flow_matching
        return ObjectiveOptions(noise_offset=self.noise_offset, min_snr_gamma=self.min_snr_gamma,
                                timestep_sampling=flow.timestep_sampling, sigmoid_scale=flow.sigmoid_scale,
                                logit_mean=flow.logit_mean, logit_std=flow.logit_std, shift=flow.shift,
                                dynamic_shift=flow.dynamic_shift, guidance_scale=flow.guidance_scale)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.method == Method.textual_inversion and not self.textual_inversion.token.strip():
            raise ValueError("textual_inversion.token must not be empty")
        if self.regularization.target == "base":
            self._check_base_target()
        if self.guided_target_scale is not None and self.method not in ADAPTER_METHODS:
            raise TrainingInputInvalid(f"guided_target_scale needs the frozen base's prediction, from an adapter "
                                       f"method ({', '.join(m.value for m in ADAPTER_METHODS)}), not "
                                       f"{self.method.value}", field="guided_target_scale")
        return self

    def _check_base_target(self) -> None:
        # Raised as the domain error itself (pydantic passes it through) so that it names the field.
        if self.method not in ADAPTER_METHODS:
            raise TrainingInputInvalid(f"regularization.target=base needs an adapter method that can be switched off "
                                       f"({', '.join(m.value for m in ADAPTER_METHODS)}), not {self.method.value}",
                                       field="regularization.target")
        if self.method != Method.dreambooth and not self.data.marks_regularization:
            raise TrainingInputInvalid("regularization.target=base needs data.trigger with "
                                       "data.trigger_mode=substitute: regularization examples are the captions "
                                       "without [trigger]", field="regularization.target")


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise TrainingInputInvalid(f"--set {dotted}: {key} is not a section", field=dotted)
    node[keys[-1]] = yaml.safe_load(raw)


def load_train_config(path: Path | None, overrides: list[str] | None = None, **extra: Any) -> TrainConfig:
    """The validated config from a YAML file plus ``--set key=value`` overrides."""
    tree: dict = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise TrainingInputInvalid(f"cannot read config {path}: {exc}", field="config") from exc
        if not isinstance(tree, dict):
            raise TrainingInputInvalid(f"config {path} must be a mapping", field="config")
    for item in overrides or []:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted:
            raise TrainingInputInvalid(f"--set expects dotted.key=value, got {item!r}", field="set")
        _set_dotted(tree, dotted.strip(), raw)
    for dotted, value in extra.items():
        if value is not None:
            _set_dotted(tree, dotted, yaml.safe_dump(value))
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise TrainingInputInvalid(f"invalid training config: {field}: {first['msg']}", field=field,
                                   problems=problems) from exc
