"""The one training loop. Methods (methods.py) say what trains; this says how a step runs.

    scan data -> load base -> (class images) -> method.prepare -> batches -> optimizer
    -> for each step: micro-batches -> loss -> backward -> clip -> step -> method.after_step
    -> checkpoints / validation -> export -> publish (only on success)
"""

from __future__ import annotations

# Imports inside functions: bitsandbytes only for its 8-bit optimizer (CUDA).
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from lorafleet.accelerator import resolve_placement
from lorafleet.bases import load_base
from lorafleet.registry.payload import AdapterPayload

from .batches import Batch, BatchSource, ClassBatchSource, TextEncoder, step_generator
from .checkpoint import TrainingState, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import DataReport, scan
from .errors import TrainingInputInvalid
from .methods import TrainingMethod, method_for
from .observers import Observers, RunObserver, StepCallback, StepRecord
from .reporting import clip_score, latent_distance, sample_images, save_grid, save_loss_curve, write_metrics
from .tracking import tracking_observers

logger = logging.getLogger(__name__)
ADAPTER_FILE = "adapter.safetensors"  # the finished run's adapter, written before any optional report


@dataclass
class TrainResult:
    payload: AdapterPayload
    state: TrainingState
    data_report: DataReport
    metrics: dict
    output_dir: Path
    manifest: object | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)  # e.g. the tracking run id (observers)


class Interrupted(Exception):
    """Raised by an observer to stop a run (tests, signals, a cancelled job); nothing is published."""


@dataclass(frozen=True)
class StepOutcome:
    loss: float
    learning_rate: float
    grad_norm: float


def _optimizer(parameters, config: TrainConfig):
    settings = config.optimizer
    if settings.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)


def _lr_scheduler(optimizer, config: TrainConfig):
    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[config.optimizer.schedule]
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=config.optimizer.warmup_steps,
                         num_training_steps=config.max_steps)


class Trainer:
    def __init__(self, config: TrainConfig, progress=None, rank: int = 0, world_size: int = 1,
                 observers: list[RunObserver] | None = None):
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.after_backward = None  # e.g. gradient averaging across data-parallel workers
        self.placement = resolve_placement()
        self.examples, self.data_report = scan(config.data)
        if not self.examples:
            raise TrainingInputInvalid(f"no usable images in {config.data.path}: {self.data_report.summary()}",
                                       field="data.path")
        if config.epochs is not None:  # passes over the data, as optimizer steps
            per_step = config.batch_size * config.gradient_accumulation
            config = config.model_copy(update={"max_steps": max(1, math.ceil(
                config.epochs * len(self.examples) / per_step))})
            self.config = config
        self.method: TrainingMethod = method_for(config)
        self.method.prepare_examples(self.examples)
        torch.manual_seed(config.seed)
        self.base = load_base(config.base, base_config=config.base_config)
        self.pipe = self.base.pipeline.to(self.placement.device)
        self.family = self.base.family
        self.method.check_family(self.family)
        if config.data.resolution % self.family.size_multiple:
            raise TrainingInputInvalid(f"data.resolution must be a multiple of {self.family.size_multiple} for "
                                       f"{self.family.title} bases", field="data.resolution")
        if config.guided_target_scale is not None and self.family.offers_true_cfg:
            raise TrainingInputInvalid(f"guided_target_scale: {self.family.title} bases guide through a guidance "
                                       "embedding, not classic classifier-free guidance", field="guided_target_scale")
        self.objective = self.family.training_objective(self.pipe, config.objective_options())
        self.class_source = self._class_images() if self.method.class_examples_needed() else None
        self.parameters = self.method.prepare(self.pipe)
        if config.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.batches = BatchSource(self.pipe, self.examples, config, self.placement.device)
        self.text = TextEncoder(self.pipe, self.method.uses_text_encoder_grad(), self.placement.device)
        self.optimizer = _optimizer(self.parameters, config)
        self.lr_scheduler = _lr_scheduler(self.optimizer, config)
        self.ema = self._ema()
        self.state = TrainingState()
        tracking = tracking_observers(config) if rank == 0 else []  # one writer per run
        self.observers = Observers([StepCallback(progress) if progress else None, *tracking, *(observers or [])])

    @property
    def denoiser(self) -> torch.nn.Module:
        """The pipeline's denoiser now (QLoRA replaces it with its quantized copy)."""
        return getattr(self.pipe, self.family.denoiser)

    def _ema(self):
        if self.config.ema_decay is None:
            return None
        return EMAModel(self.parameters, decay=self.config.ema_decay)

    def _class_images(self) -> ClassBatchSource:
        settings = self.config.dreambooth
        generator = torch.Generator().manual_seed(self.config.seed + 7)
        size = self.config.data.resolution
        with torch.no_grad():
            latents = self.pipe(settings.class_prompt, num_inference_steps=settings.class_image_steps,
                                num_images_per_prompt=settings.num_class_images, generator=generator,
                                height=size, width=size, output_type="latent",
                                **self.family.pipeline_call_options(self.pipe)).images
        latents = self.family.latents_of_pipeline_output(self.pipe, latents, size, size)
        return ClassBatchSource(latents * 1.0, settings.class_prompt, self.config)

    # ------------------------------------------------------------------ one step
    def _loss(self, batch: Batch, step: int, stream: int) -> torch.Tensor:
        generator = step_generator(self.config.seed, step, 500 + stream)
        noised = self.objective.noised(batch.latents, generator)
        target = self._toward_base(batch, noised.noisy, noised.timesteps, noised.target)
        target = self._for_guidance(batch, noised.noisy, noised.timesteps, target)
        with self._autocast():
            prediction = self._predict(batch, noised.noisy, noised.timesteps)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
        per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
        weights = noised.weights * batch.weights
        return (per_sample * weights.to(per_sample.device)).mean()

    def _toward_base(self, batch: Batch, noisy: torch.Tensor, timesteps: torch.Tensor,
                     target: torch.Tensor) -> torch.Tensor:
        """``regularization.target=base``: regularization rows aim at the frozen base's own
        prediction for the same noisy input, so the adapter learns to change nothing there."""
        rows = batch.regularization
        if self.config.regularization.target != "base" or not rows.any():
            return target
        rows = rows.to(target.device)
        target = target.clone()
        target[rows] = self._base_prediction(batch.rows(rows), noisy[rows], timesteps[rows]).to(target.dtype)
        return target

    def _for_guidance(self, batch: Batch, noisy: torch.Tensor, timesteps: torch.Tensor,
                      target: torch.Tensor) -> torch.Tensor:
        """``guided_target_scale``: instance rows aim at u + (target - u) / scale, u the frozen base's
        unconditional prediction, so that guidance at that scale (u + scale * (prediction - u))
        reproduces their images. Regularization rows keep their target."""
        scale = self.config.guided_target_scale
        rows = ~batch.regularization
        if scale is None or not rows.any():
            return target
        rows = rows.to(target.device)
        instance = batch.rows(rows)
        unconditional = replace(instance, captions=[""] * len(instance.captions))
        target = target.clone()
        base = self._base_prediction(unconditional, noisy[rows], timesteps[rows]).to(target.dtype)
        target[rows] = base + (target[rows] - base) / scale
        return target

    def _base_prediction(self, batch: Batch, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The frozen base's prediction (the adapter switched off), without gradients."""
        with torch.no_grad(), self.method.base_model(self.pipe), self._autocast():
            return self._predict(batch, noisy, timesteps)

    def _predict(self, batch: Batch, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser's prediction, conditioned as the base's family conditions it."""
        hidden, pooled = self.text(batch.captions)
        return self.objective.predict(noisy, timesteps, hidden, pooled, batch.time_ids)

    def _autocast(self):
        dtype = self._autocast_dtype()
        return torch.autocast(device_type=self.placement.device.type, dtype=dtype, enabled=dtype is not None)

    def _autocast_dtype(self):
        if not self.placement.is_cuda or self.config.mixed_precision == "no":
            return None
        return torch.bfloat16 if self.config.mixed_precision == "bf16" else torch.float16

    def step(self, step: int) -> StepOutcome:
        self.denoiser.train()
        total = 0.0
        for index in range(self.config.gradient_accumulation):
            micro = self.rank * 10_000 + index  # each data-parallel worker draws its own batches
            batch = self.batches.batch(step, micro)
            instance = self._loss(batch, step, micro)
            prior = None
            if self.class_source is not None:
                class_batch = self.class_source.batch(step, micro)
                prior = self._loss(class_batch, step, 5_000 + micro)
            loss = self.method.combine(instance, prior) / self.config.gradient_accumulation
            loss.backward()
            total += float(loss.detach())
        if self.after_backward is not None:
            self.after_backward(self.parameters)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, self.config.optimizer.max_grad_norm))
        learning_rate = float(self.lr_scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_step(self.pipe)
        if self.ema is not None:
            self.ema.step(self.parameters)
        return StepOutcome(total, learning_rate, grad_norm)

    # ------------------------------------------------------------------ the run
    def resume(self) -> bool:
        checkpoint = latest_checkpoint(self.config.output_dir)
        if checkpoint is None:
            return False
        self.state, trainable = load_checkpoint(checkpoint, self.optimizer, self.lr_scheduler, self.ema,
                                                self._config_json())
        self.method.load_trainable_state(self.pipe, trainable)
        return True

    def _config_json(self) -> dict:
        return self.config.model_dump(mode="json")

    def _checkpoint(self) -> Path:
        return save_checkpoint(self.config.output_dir, self.state, self.method.trainable_state(self.pipe),
                               self.optimizer, self.lr_scheduler, self.ema, self._config_json())

    def run(self, save_checkpoints: bool = True) -> TrainResult:
        try:
            return self._run(save_checkpoints)
        finally:
            self.observers.close()

    def _run(self, save_checkpoints: bool) -> TrainResult:
        every = self.config.checkpoint_every if save_checkpoints else 0
        started = time.perf_counter() - self.state.seconds
        self.observers.on_start(self.config, self.config.max_steps, self.state.step)
        for step in range(self.state.step, self.config.max_steps):
            outcome = self.step(step)
            if not math.isfinite(outcome.loss):
                raise TrainingInputInvalid(f"loss became {outcome.loss} at step {step}; lower "
                                           "optimizer.learning_rate", field="optimizer.learning_rate")
            self.state.losses.append(outcome.loss)
            self.state.step = step + 1
            self.state.seconds = time.perf_counter() - started
            if every and self.state.step % every == 0 and self.state.step < self.config.max_steps:
                self.observers.on_checkpoint(self.state.step, self._checkpoint())
                self._validation_grid()
                self._progress_files()
            self.observers.on_step(StepRecord(self.state.step, self.config.max_steps, outcome.loss,
                                              outcome.learning_rate, outcome.grad_norm, self.state.seconds),
                                   self.state)
        if save_checkpoints:
            self.observers.on_checkpoint(self.state.step, self._checkpoint())
        result = self._finish()
        self._optional("observers", result.metrics.setdefault("warnings", []), self.observers.on_finish, result)
        if not result.metrics["warnings"]:
            del result.metrics["warnings"]
        result.lineage = self.observers.lineage()
        return result

    def _validation_grid(self) -> Path | None:
        prompts = self.config.validation_prompts
        if not prompts:
            return None
        self.denoiser.eval()
        images = sample_images(self.pipe, prompts, self.config.seed)
        path = Path(self.config.output_dir) / "samples" / f"step-{self.state.step:09d}.png"
        grid = save_grid([images], path)
        self.observers.on_validation(self.state.step, grid, images)
        return grid

    def _progress_files(self) -> None:
        """Loss curve and metrics so far, next to each checkpoint."""
        output = Path(self.config.output_dir)
        save_loss_curve(self.state.losses, output / "loss.png")
        write_metrics(output / "metrics.json", {"steps": self.state.step, "of": self.config.max_steps,
                                                "loss_last": self.state.losses[-1],
                                                "seconds": round(self.state.seconds, 2)})

    def _finish(self) -> TrainResult:
        """The adapter first (exported and written next to the last checkpoint), then the optional
        reports: a failing report is a warning in metrics.json, never a lost run."""
        if self.ema is not None:
            self.ema.copy_to(self.parameters)
        self.denoiser.eval()
        output = Path(self.config.output_dir)
        payload = self.method.export(self.pipe)
        artifacts = {"adapter": _write_atomically(output / ADAPTER_FILE, payload.to_bytes())}
        warnings: list[str] = []
        artifacts["loss_curve"] = self._optional("loss curve", warnings, save_loss_curve, self.state.losses,
                                                 output / "loss.png")
        grid = self._optional("validation grid", warnings, self._validation_grid)
        if grid:
            artifacts["samples"] = grid
        metrics = self._metrics(warnings)
        artifacts["metrics"] = write_metrics(output / "metrics.json", metrics)
        return TrainResult(payload, self.state, self.data_report, metrics, output,
                           artifacts={k: v for k, v in artifacts.items() if v is not None})

    @staticmethod
    def _optional(name: str, warnings: list[str], function, *args):
        """Run an optional report; a failure becomes a warning (logged, and kept in metrics.json)."""
        try:
            return function(*args)
        except Exception as exc:  # any failure of a report: the trained adapter is already safe
            warnings.append(f"{name} failed: {type(exc).__name__}: {exc}")
            logger.warning("optional %s failed after the run finished: %s", name, exc, exc_info=True)
            return None

    def _metrics(self, warnings: list[str]) -> dict:
        losses = self.state.losses
        tail = losses[-max(1, len(losses) // 10):]
        prompts = self.config.validation_prompts or [self.examples[0].caption or "a photo"]
        metrics = {
            "steps": self.state.step, "seconds": round(self.state.seconds, 2),
            "steps_per_second": round(self.state.step / self.state.seconds, 3) if self.state.seconds else None,
            "loss_first": round(losses[0], 6), "loss_final": round(sum(tail) / len(tail), 6),
            "method": self.method.report.details,
            "data": {"kept": self.data_report.kept, "skipped": {k: len(v) for k, v in
                                                               self.data_report.skipped.items()}},
        }
        metrics["latent_distance_with_adapter"] = self._optional(
            "latent distance", warnings, latent_distance, self.pipe, prompts, self.batches.cached, self.config.seed)
        metrics["latent_distance_without_adapter"] = self._optional(
            "latent distance without the adapter", warnings, self._distance_without_adapter, prompts)
        if self.config.clip_model and self.config.validation_prompts:
            metrics["clip_score"] = self._optional("CLIP score", warnings, self._clip_score)
        if warnings:
            metrics["warnings"] = list(warnings)
        return metrics

    def _clip_score(self) -> float:
        images = sample_images(self.pipe, self.config.validation_prompts, self.config.seed)
        return clip_score(images, self.config.validation_prompts, self.config.clip_model)

    def _distance_without_adapter(self, prompts: list[str]):
        """The same distance from the frozen base (every trained adapter off, the text encoder's too)."""
        if not self.method.can_switch_to_base or self.batches.cached is None:
            return None
        with self.method.base_model(self.pipe):
            return latent_distance(self.pipe, prompts, self.batches.cached, self.config.seed)


def _write_atomically(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, path)
    return path


def train(config: TrainConfig, *, resume: bool = False, progress=None,
          observers: list[RunObserver] | None = None) -> TrainResult:
    """Run (or resume) one training run; publishing is the caller's next step."""
    trainer = Trainer(config, progress, observers=observers)
    if resume:
        trainer.resume()
    return trainer.run()
