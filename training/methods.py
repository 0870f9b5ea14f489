"""Training methods as small strategies over one loop.

A method decides what is trainable (``prepare``), what the examples and a batch hold beyond the
instance images (``prepare_examples``, ``class_examples_needed``), how the losses combine
(``combine``), and what is published (``export``); the loop asks, and never tests which method
it runs.
LoRA, DreamBooth-LoRA (prior preservation), QLoRA (4-bit base), textual inversion and full
fine-tuning differ only there.
"""

from __future__ import annotations

# Imports inside functions: bitsandbytes only for QLoRA on CUDA.
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers import BitsAndBytesConfig
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from lorafleet.families import family_of_pipeline
from lorafleet.registry.manifest import AdapterFormat, AdapterMethod, ComponentLora
from lorafleet.registry.payload import AdapterPayload

from .config import Method, TrainConfig
from .errors import TrainingInputInvalid


@dataclass
class MethodReport:
    """What a method wants recorded (e.g. QLoRA's quantized layers and memory saving)."""

    details: dict = field(default_factory=dict)


class TrainingMethod:
    """Base strategy: nothing trainable, nothing extra. Subclasses override what differs."""

    adapter_method = AdapterMethod.lora
    can_switch_to_base = False  # whether ``base_model`` works (layers trained over a frozen base)

    def __init__(self, config: TrainConfig):
        self.config = config
        self.report = MethodReport()

    def check_family(self, family) -> None:
        """Refuse (TrainingInputInvalid) a base whose family this method cannot train."""

    def prepare_examples(self, examples: list) -> None:
        """Adjust the scanned examples before training (DreamBooth: one instance prompt)."""
    def prepare(self, pipe) -> list[torch.nn.Parameter]:
        """Make the pipeline trainable as this method wants; return the trainable parameters."""
        raise NotImplementedError

    def uses_text_encoder_grad(self) -> bool:
        return False

    def class_examples_needed(self) -> int:
        return 0

    def combine(self, instance_loss: torch.Tensor, class_loss: torch.Tensor | None) -> torch.Tensor:
        return instance_loss

    def after_step(self, pipe) -> None:
        """Called after each optimizer step (e.g. textual inversion restores frozen rows)."""
    def export(self, pipe) -> AdapterPayload:
        raise NotImplementedError

    @contextmanager
    def base_model(self, pipe):
        """Within the block the pipeline predicts as the frozen base (``regularization.target=base``);
        only methods that train layers over a frozen base can (config.ADAPTER_METHODS)."""
        raise NotImplementedError(f"{type(self).__name__} cannot switch back to the base model")
        yield

    def trainable_state(self, pipe) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must hold to resume (by default: what is exported)."""
        return dict(self.export(pipe).tensors)

    def load_trainable_state(self, pipe, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


def _lora_config(rank: int, alpha: float, targets: list[str], dropout: float):
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                      init_lora_weights="gaussian")


def _peft_targets(model, adapter_name: str = "default") -> list[str]:
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, LoraLayer) and adapter_name in module.lora_A)


class LoraMethod(TrainingMethod):
    adapter_method = AdapterMethod.lora
    can_switch_to_base = True

    def prepare(self, pipe) -> list[torch.nn.Parameter]:
        settings = self.config.lora
        denoiser = family_of_pipeline(pipe).denoiser
        for name, model in self._components(pipe).items():
            targets = settings.target_modules if name == denoiser else settings.text_encoder_targets
            model.add_adapter(_lora_config(settings.rank, settings.alpha, targets, settings.dropout))
        return [p for model in self._components(pipe).values() for n, p in model.named_parameters()
                if "lora_" in n and p.requires_grad]

    def uses_text_encoder_grad(self) -> bool:
        return self.config.lora.text_encoder

    def _components(self, pipe) -> dict:
        """The denoiser, and every adapted text encoder of the family when ``lora.text_encoder`` is set."""
        family = family_of_pipeline(pipe)
        names = family.lora_components if self.config.lora.text_encoder else (family.denoiser,)
        return {name: getattr(pipe, name) for name in names}

    def export(self, pipe) -> AdapterPayload:
        tensors, components = {}, {}
        for name, model in self._components(pipe).items():
            for key, value in get_peft_model_state_dict(model).items():
                tensors[f"{name}.{key}"] = value.detach().to("cpu", torch.float32).clone()
            components[name] = ComponentLora(rank=self.config.lora.rank, alpha=self.config.lora.alpha,
                                             target_modules=_peft_targets(model))
        trigger = [self.config.data.trigger] if self.config.data.trigger else []
        return AdapterPayload(AdapterFormat.diffusers_lora, tensors, components, trigger_tokens=trigger,
                              source_format="lorafleet-train")

    @contextmanager
    def base_model(self, pipe):
        models = list(self._components(pipe).values())
        for model in models:
            model.disable_adapters()
        try:
            yield
        finally:
            for model in models:
                model.enable_adapters()

    def load_trainable_state(self, pipe, state: dict[str, torch.Tensor]) -> None:
        for name, model in self._components(pipe).items():
            prefix = f"{name}."
            set_peft_model_state_dict(model, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


class DreamBoothMethod(LoraMethod):
    """LoRA plus prior preservation: the base's own class images keep the class prompt intact."""

    adapter_method = AdapterMethod.dreambooth

    def prepare_examples(self, examples: list) -> None:
        prompt = self.config.dreambooth.instance_prompt
        if prompt:
            for example in examples:
                example.caption, example.regularization = prompt, False

    def class_examples_needed(self) -> int:
        return self.config.dreambooth.num_class_images

    def combine(self, instance_loss: torch.Tensor, class_loss: torch.Tensor | None) -> torch.Tensor:
        if class_loss is None:
            return instance_loss
        return instance_loss + self.config.dreambooth.prior_loss_weight * class_loss


class QLoraMethod(LoraMethod):
    """LoRA over a 4-bit NF4 base (bitsandbytes Linear4bit), built layer by layer.

    bitsandbytes on CPU runs 4-bit layers whose input size is a multiple of 64 (and, in
    inference, output size a multiple of 32); other layers stay in full precision, and the
    report says which.
    """

    adapter_method = AdapterMethod.qlora

    def prepare(self, pipe) -> list[torch.nn.Parameter]:
        denoiser = family_of_pipeline(pipe).denoiser
        if getattr(pipe, denoiser).device.type == "cuda":
            self.report.details = quantize_with_diffusers(pipe, denoiser)
        else:
            self.report.details = quantize_linear_layers(getattr(pipe, denoiser))
        return super().prepare(pipe)


def quantize_with_diffusers(pipe, denoiser: str) -> dict:
    """On CUDA: diffusers' own bitsandbytes path (it refuses to run without a GPU), for the
    family's denoiser (UNet or transformer)."""
    import bitsandbytes as bnb

    model = getattr(pipe, denoiser)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=model.dtype)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        quantized = type(model).from_pretrained(folder, quantization_config=config, torch_dtype=model.dtype)
    pipe.register_modules(**{denoiser: quantized.requires_grad_(False)})
    after = sum(p.numel() * p.element_size() for p in quantized.parameters())
    layers = [name for name, module in quantized.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    return {"quantized_layers": len(layers), "full_precision_layers": [], "denoiser_bytes_before": before,
            "denoiser_bytes_after": after, "memory_saving_bytes": before - after}


def _eligible_for_4bit(module: torch.nn.Linear) -> bool:
    return module.in_features % 64 == 0 and module.out_features % 32 == 0


def quantize_linear_layers(model: torch.nn.Module) -> dict:
    """Replace eligible nn.Linear layers of ``model`` with NF4 Linear4bit, in place."""
    import bitsandbytes as bnb

    quantized, kept, bytes_before, bytes_after = [], [], 0, 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            path = f"{parent_name}.{child_name}".strip(".")
            weight_bytes = child.weight.numel() * child.weight.element_size()
            if not _eligible_for_4bit(child):
                kept.append(path)
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
            layer = layer.to(child.weight.device)  # quantizes
            setattr(parent, child_name, layer)
            quantized.append(path)
            bytes_before += weight_bytes
            bytes_after += child.weight.numel() // 2
    return {"quantized_layers": len(quantized), "full_precision_layers": kept,
            "linear_bytes_fp32": bytes_before, "linear_bytes_4bit": bytes_after,
            "memory_saving_bytes": bytes_before - bytes_after}


class TextualInversionMethod(TrainingMethod):
    """New token(s) whose embeddings are the only trainable numbers, in every text encoder of the
    family (SDXL: both, published as clip_l and clip_g)."""

    adapter_method = AdapterMethod.textual_inversion

    def check_family(self, family) -> None:
        if not family.textual_inversion:
            raise TrainingInputInvalid(f"{family.title} pipelines load no textual-inversion embeddings",
                                       field="method")

    def _tokens(self) -> list[str]:
        settings = self.config.textual_inversion
        return [settings.token] + [f"{settings.token}_{i}" for i in range(1, settings.num_vectors)]

    def prepare(self, pipe) -> list[torch.nn.Parameter]:
        self.family = family_of_pipeline(pipe)
        self.token_ids, self.frozen_rows, trainable = {}, {}, []
        for name, tokenizer, encoder in self.family.text_pairs(pipe):
            trainable.append(self._add_tokens(name, tokenizer, encoder))
        return trainable

    def _add_tokens(self, name: str, tokenizer, encoder) -> torch.nn.Parameter:
        tokens = self._tokens()
        if tokenizer.add_tokens(tokens) != len(tokens):
            raise ValueError(f"token {self.config.textual_inversion.token!r} already exists in the tokenizer")
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = encoder.get_input_embeddings().weight
        self.token_ids[name] = tokenizer.convert_tokens_to_ids(tokens)
        init = self._init_vector(tokenizer, embeddings)
        with torch.no_grad():
            for token_id in self.token_ids[name]:
                embeddings[token_id] = init
        self.frozen_rows[name] = embeddings.detach().clone()
        embeddings.requires_grad_(True)
        return embeddings

    def _init_vector(self, tokenizer, embeddings: torch.Tensor) -> torch.Tensor:
        word = self.config.textual_inversion.init_word
        if word:
            ids = tokenizer(word, add_special_tokens=False).input_ids
            return embeddings[ids].detach().mean(dim=0)
        return embeddings[: len(tokenizer) - len(self._tokens())].detach().mean(dim=0)

    def uses_text_encoder_grad(self) -> bool:
        return True

    def _embeddings(self, pipe) -> dict[str, torch.Tensor]:
        return {name: encoder.get_input_embeddings().weight for name, _, encoder in self.family.text_pairs(pipe)}

    def after_step(self, pipe) -> None:
        for name, embeddings in self._embeddings(pipe).items():
            keep = torch.ones(embeddings.shape[0], dtype=torch.bool)
            keep[self.token_ids[name]] = False
            with torch.no_grad():
                embeddings[keep] = self.frozen_rows[name][keep]  # only the new rows learn

    def _keys(self) -> dict[str, str]:
        """Text encoder -> tensor name in the published file (the token, or SDXL's clip_l/clip_g)."""
        keyed = dict(self.family.embedding_keys)
        return {name: keyed.get(name, self.config.textual_inversion.token) for name in self.family.lora_text_encoders}

    def export(self, pipe) -> AdapterPayload:
        keys, token = self._keys(), self.config.textual_inversion.token
        tensors = {keys[name]: embeddings[self.token_ids[name]].detach().to("cpu", torch.float32).clone()
                   for name, embeddings in self._embeddings(pipe).items()}  # [vectors, hidden] each
        return AdapterPayload(AdapterFormat.textual_inversion, tensors, trigger_tokens=[token],
                              source_format="lorafleet-train")

    def load_trainable_state(self, pipe, state: dict[str, torch.Tensor]) -> None:
        keys = self._keys()
        with torch.no_grad():
            for name, embeddings in self._embeddings(pipe).items():
                embeddings[self.token_ids[name]] = state[keys[name]].to(embeddings.dtype)


class FullMethod(TrainingMethod):
    """Every weight of the denoiser trains (sensible for small bases); the result is a full denoiser."""

    adapter_method = AdapterMethod.full

    def prepare(self, pipe) -> list[torch.nn.Parameter]:
        self.denoiser = family_of_pipeline(pipe).denoiser
        getattr(pipe, self.denoiser).requires_grad_(True)
        return list(getattr(pipe, self.denoiser).parameters())

    def export(self, pipe) -> AdapterPayload:
        tensors = {f"{self.denoiser}.{k}": v.detach().to("cpu", torch.float32).clone()
                   for k, v in getattr(pipe, self.denoiser).state_dict().items()}
        return AdapterPayload(AdapterFormat.full_unet, tensors, source_format="lorafleet-train")

    def load_trainable_state(self, pipe, state: dict[str, torch.Tensor]) -> None:
        prefix = f"{self.denoiser}."
        getattr(pipe, self.denoiser).load_state_dict({k.removeprefix(prefix): v for k, v in state.items()})


METHODS: dict[Method, type[TrainingMethod]] = {
    Method.lora: LoraMethod,
    Method.dreambooth: DreamBoothMethod,
    Method.qlora: QLoraMethod,
    Method.textual_inversion: TextualInversionMethod,
    Method.full: FullMethod,
}


def method_for(config: TrainConfig) -> TrainingMethod:
    return METHODS[config.method](config)
