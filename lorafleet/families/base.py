"""What a model family answers (``ModelFamily``), and the typed contracts between it and its callers:
what decides an image (``ImageSpec``, ``BatchShape``), what a prompt becomes (``Conditioning``), and
how a training step noises latents and scores the denoiser (``TrainingObjective``)."""

from __future__ import annotations

# Imports inside functions: diffusers only when a pipeline class is needed (families are asked for
# names at start-up).
from collections.abc import Callable
from dataclasses import dataclass, field

from lorafleet.errors import BaseModelError


class UnknownFamily(BaseModelError):
    """A base (or an adapter) of a model family lorafleet does not support."""


@dataclass(frozen=True)
class ImageSpec:
    """What decides one image of a batch."""

    prompt: str
    negative_prompt: str | None
    guidance_scale: float
    seed: int
    true_cfg_scale: float = 1.0  # families with a guidance embedding (Flux): classic CFG as a second pass


@dataclass(frozen=True)
class BatchShape:
    """What every image of one batch shares (the batch key's pipeline part)."""

    width: int
    height: int
    steps: int
    guided: bool  # the negative prompt takes part (``ModelFamily.guided``)


@dataclass
class Conditioning:
    """A batch's prompts as the denoiser takes them. UNet families put the negative rows first in
    ``prompt_embeds`` (guidance doubles the batch); families that guide in a second pass (Flux's
    true CFG) keep the negative prompts' conditioning in ``negative``."""

    prompt_embeds: object  # torch.Tensor [rows, tokens, hidden]
    denoiser_kwargs: dict = field(default_factory=dict)  # e.g. SDXL's added_cond_kwargs
    negative: Conditioning | None = None

    @property
    def device(self):
        """Where the batch runs: its embeddings' device (``pipe._execution_device`` would walk
        every module of every component to say the same, about a millisecond a call)."""
        return self.prompt_embeds.device


@dataclass(frozen=True)
class ObjectiveOptions:
    """The training objective's settings (training/config.py fills them from a run's config)."""

    noise_offset: float = 0.0  # noise prediction: offset noise strength
    min_snr_gamma: float | None = None  # noise prediction: Min-SNR-gamma weighting
    timestep_sampling: str = "sigmoid"  # flow matching: sigmoid | logit_normal | uniform
    sigmoid_scale: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # flow matching: sigma -> shift*sigma / (1 + (shift-1)*sigma); 1 leaves it
    dynamic_shift: bool = False  # flow matching: the shift the scheduler uses at inference for the image size
    guidance_scale: float = 1.0  # guidance-embedding families: the guidance the denoiser is told in training


@dataclass
class Noised:
    """One training batch's noisy latents, timesteps, the regression target and per-sample weights."""

    noisy: object  # torch.Tensor, the latents' shape
    timesteps: object  # torch.Tensor [batch]
    target: object  # torch.Tensor, the latents' shape
    weights: object  # torch.Tensor [batch]


class TrainingObjective:
    """How a family's denoiser is trained: ``noised`` draws noise and timesteps for a batch of
    latents, ``predict`` runs the denoiser on them (conditioned on text hidden states, pooled
    embedding and SDXL-style size ids); the loss is the weighted mean squared error."""

    def noised(self, latents, generator) -> Noised:
        raise NotImplementedError

    def predict(self, noisy, timesteps, hidden, pooled, time_ids):
        raise NotImplementedError


def between(timesteps, between_steps: Callable[[], None] | None):
    """``timesteps``, calling ``between_steps`` at every step boundary (before the first step,
    between two, after the last): another pass may run there (serve/batching.py), so a loop
    keeps its state in locals and re-reads ``pipe.scheduler``."""
    for t in timesteps:
        if between_steps is not None:
            between_steps()
        yield t
    if between_steps is not None:
        between_steps()


def per_image(values: list[float], like):
    """One value per image as a tensor broadcasting over ``like``'s other dimensions."""
    import torch

    scales = torch.tensor(values, dtype=torch.float64)
    return scales.to(dtype=like.dtype, device=like.device).view(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class ModelFamily:
    """One model family. Subclasses override the behaviour that differs; fields are data."""

    name: str  # "sd1", "sdxl", "flux", "sd3"
    title: str  # for people: "Stable Diffusion 1.x/2.x"
    pipeline_classes: tuple[str, ...]  # diffusers pipeline classes; the first is text-to-image
    denoiser: str  # "unet" or "transformer"
    text_encoders: tuple[str, ...]  # pipeline attribute names, in order
    tokenizers: tuple[str, ...]
    native_resolution: int  # pixels of the side of the real family's training images
    kohya_prefixes: tuple[tuple[str, str], ...]  # (component, kohya prefix without "lora_"), export order
    example_base: str  # the built-in base `--print-config` examples use
    example_rank: int  # LoRA rank and learning rate usual for the real family
    example_learning_rate: float
    checkpoint_text_encoders: tuple[tuple[str, str, str], ...] = ()  # (text encoder, key prefix, "clip" |
    # "openclip") in an original-layout single-file checkpoint
    embedding_keys: tuple[tuple[str, str], ...] = ()  # (text encoder, key) of a textual-inversion file; ():
    # one encoder, keyed by token
    adapted_text_encoders: tuple[str, ...] | None = None  # the ones LoRA and textual inversion reach (None: all;
    # Flux: CLIP only, as diffusers and the trainers do)
    size_multiple: int = 8  # image sides in pixels are multiples of this (VAE factor; x2 where latents are packed)
    default_guidance_scale: float = 7.5
    offers_true_cfg: bool = False  # a request may ask for classic CFG beside the guidance embedding
    example_targets: tuple[str, ...] | None = None  # LoRA target modules of `--print-config` (None: the default)
    example_resolution: int = 32  # the example base's native size (a built-in tiny base)
    single_file_layout: str = "ldm"  # the original single-file checkpoint: "ldm" (the whole pipeline, LDM/SGM
    # names) or "bfl-transformer" (Flux: the transformer alone, Black Forest Labs' names)
    textual_inversion: bool = True  # the pipeline loads embeddings (SD 3 loads none)
    objective: str = "noise_prediction"  # or "flow_matching": how the family trains (training_objective)

    @property
    def lora_text_encoders(self) -> tuple[str, ...]:
        return self.text_encoders if self.adapted_text_encoders is None else self.adapted_text_encoders

    @property
    def lora_components(self) -> tuple[str, ...]:
        """The pipeline components a LoRA may target: the denoiser and the adapted text encoders."""
        return (self.denoiser, *self.lora_text_encoders)

    @property
    def pipeline_class(self) -> str:
        return self.pipeline_classes[0]

    def recognises_pipeline_class(self, class_name: str) -> bool:
        return class_name in self.pipeline_classes

    def recognises_checkpoint(self, keys: set[str]) -> bool:
        raise NotImplementedError

    @property
    def load_options(self) -> dict:
        """Keyword arguments for the pipeline's from_pretrained / from_single_file."""
        return {}

    def load_pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def load_single_file(self, path: str, base_config: str | None):
        """A pipeline from an original-layout single-file checkpoint (configs from ``base_config``)."""
        return self.load_pipeline_class().from_single_file(path, config=base_config, local_files_only=True,
                                                           **self.load_options)

    def pipeline_call_options(self, pipe) -> dict:
        """Keyword arguments a plain pipeline call needs to condition as ``encode`` does."""
        return {}

    def text_pairs(self, pipe) -> list[tuple[str, object, object]]:
        """(text encoder name, tokenizer, text encoder) for each adapted text encoder, in order."""
        return [(name, getattr(pipe, tokenizer), getattr(pipe, name))
                for name, tokenizer in zip(self.text_encoders, self.tokenizers) if name in self.lora_text_encoders]

    def models(self, pipe) -> dict[str, object]:
        """Every neural component of a pipeline of this family, by attribute name."""
        return {name: getattr(pipe, name) for name in (self.denoiser, "vae", *self.text_encoders)}

    def native_size(self, pipe) -> int:
        """The image side (pixels) the base was built for: its denoiser's latent side times the VAE's scale."""
        return int(getattr(pipe, self.denoiser).config.sample_size) * int(pipe.vae_scale_factor)

    def guided(self, guidance_scale: float, true_cfg_scale: float, negative_prompt: str | None) -> bool:
        """Whether the negative prompt takes part, as the family's pipeline decides it (UNet
        families: classifier-free guidance above 1)."""
        return guidance_scale > 1.0

    # ------------------------------------------------------------------ sampling
    def encode(self, pipe, prompts: list[str], negatives: list[str | None] | None, device, height: int,
               width: int) -> Conditioning:
        """Prompt embeddings (with the negative prompts' when ``negatives`` is given: guidance) and
        whatever else the denoiser takes for images of ``height`` x ``width``, as the pipeline does."""
        raise NotImplementedError

    def denoise(self, pipe, shape: BatchShape, images: list[ImageSpec], conditioning: Conditioning, generators,
                between_steps: Callable[[], None] | None = None):
        """The final latents of one batch, one image per spec, in the order the pipeline's own loop
        runs its pieces (prepare latents, scheduler, denoiser, guidance), with per-image guidance;
        ``between_steps`` is called at every step boundary (``between``)."""
        raise NotImplementedError

    def encode_for_training(self, pipe, captions: list[str], device):
        """(hidden states, pooled embedding or None) of ``captions``, with gradients when the text
        encoders train: the conditioning ``encode`` gives at serving time, without guidance."""
        tokenizer = pipe.tokenizer
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        return pipe.text_encoder(ids)[0], None  # [batch, tokens, hidden]

    def training_objective(self, pipe, options: ObjectiveOptions) -> TrainingObjective:
        raise NotImplementedError

    def latents_of_images(self, pipe, sample):
        """A VAE posterior sample -> the denoiser's latent space."""
        return (sample - (pipe.vae.config.shift_factor or 0.0)) * pipe.vae.config.scaling_factor

    def latents_of_pipeline_output(self, pipe, latents, height: int, width: int):
        """The pipeline's ``output_type="latent"`` -> latents ``[batch, channels, h, w]``."""
        return latents

    def decode(self, pipe, latents, height: int, width: int):
        """Latents to image tensors in [-1, 1]."""
        return pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]

    # ------------------------------------------------------------------ kohya / A1111 LoRA names
    def kohya_names(self, pipe, component: str, module_paths) -> dict[str, str]:
        """kohya flat name (after ``lora_<prefix>_``) -> diffusers module path, for one component of
        ``pipe``; the first name of a path is the one kohya writes (export uses it). kohya names text
        encoder modules as transformers 4 did (``text_model.encoder...``); transformers 5's
        CLIPTextModel drops ``text_model.``, so both spellings are read."""
        if component == self.denoiser:
            return {path.replace(".", "_"): path for path in module_paths}
        names = {}
        for path in module_paths:
            names["text_model_" + path.replace(".", "_") if not path.startswith("text_model.")
                  else path.replace(".", "_")] = path
        for path in module_paths:
            names.setdefault(path.replace(".", "_"), path)
        return names

    def kohya_groups(self, pipe, component: str) -> dict[str, tuple[tuple[str, ...], bool]]:
        """kohya flat name -> (diffusers module paths whose outputs the kohya module stacks, output
        halves swapped): the modules kohya's layout fuses (Flux's qkv), beside ``kohya_names``' one-to-one."""
        return {}

    def foreign_lora_as_kohya(self, keys) -> tuple[dict[str, str], str] | None:
        """(old key -> kohya key, source format name) when ``keys`` are one of the family's other
        LoRA layouts that name modules as kohya's layout does (Flux: XLabs); otherwise None."""
        return None

    def kohya_prefix(self, component: str) -> str:
        return dict(self.kohya_prefixes)[component]
