"""What a model family answers (``ModelFamily``) and what it hands the sampler (``Conditioning``)."""

from __future__ import annotations

# Imports inside functions: diffusers only when a pipeline class is needed (families are asked for
# names at start-up).
from dataclasses import dataclass, field

from lorafleet.errors import BaseModelError


class UnknownFamily(BaseModelError):
    """A base (or an adapter) of a model family lorafleet does not support."""


@dataclass
class Conditioning:
    """A batch's prompts as the denoiser takes them (classifier-free guidance rows first)."""

    prompt_embeds: object  # torch.Tensor [rows, tokens, hidden]
    denoiser_kwargs: dict = field(default_factory=dict)  # e.g. SDXL's added_cond_kwargs


@dataclass(frozen=True)
class ModelFamily:
    """One model family. Subclasses override the behaviour that differs; fields are data."""

    name: str  # "sd1", "sdxl"
    title: str  # for people: "Stable Diffusion 1.x/2.x"
    pipeline_classes: tuple[str, ...]  # diffusers pipeline classes; the first is text-to-image
    denoiser: str  # "unet" (later "transformer")
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

    @property
    def lora_components(self) -> tuple[str, ...]:
        """The pipeline components a LoRA may target: the denoiser and the text encoders."""
        return (self.denoiser, *self.text_encoders)

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

    def text_pairs(self, pipe) -> list[tuple[str, object, object]]:
        """(text encoder name, tokenizer, text encoder) for each text encoder, in order."""
        return [(name, getattr(pipe, tokenizer), getattr(pipe, name))
                for name, tokenizer in zip(self.text_encoders, self.tokenizers)]

    def models(self, pipe) -> dict[str, object]:
        """Every neural component of a pipeline of this family, by attribute name."""
        return {name: getattr(pipe, name) for name in (self.denoiser, "vae", *self.text_encoders)}

    # ------------------------------------------------------------------ conditioning
    def encode(self, pipe, prompts: list[str], negatives: list[str | None] | None, device, height: int,
               width: int) -> Conditioning:
        """Prompt embeddings (negative rows first when ``negatives`` is given: guidance) and whatever
        else the denoiser takes for images of ``height`` x ``width``, as the family's pipeline does."""
        raise NotImplementedError

    def encode_for_training(self, pipe, captions: list[str], device):
        """(hidden states, pooled embedding or None) of ``captions``, with gradients when the text
        encoders train: the conditioning ``encode`` gives at serving time, without guidance."""
        tokenizer = pipe.tokenizer
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        return pipe.text_encoder(ids)[0], None  # [batch, tokens, hidden]

    def denoiser_kwargs(self, pooled, time_ids) -> dict:
        """What the denoiser takes beyond hidden states in training (``time_ids``: [batch, 6] of
        original height and width, crop top and left, target height and width)."""
        return {}

    def decode(self, pipe, latents):
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

    def kohya_prefix(self, component: str) -> str:
        return dict(self.kohya_prefixes)[component]
