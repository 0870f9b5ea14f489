"""Base models: the built-in ones, loading from a path, and what adapters need to know of a base."""

from __future__ import annotations

# Imports inside functions: diffusers only when a pipeline is built or loaded.
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.bases.spec import BaseSpec, ModuleShape
from lorafleet.errors import BaseModelError
from lorafleet.families import (
    ModelFamily,
    family_named,
    family_of_checkpoint_keys,
    family_of_class_name,
    family_of_pipeline,
)

from .fingerprint import pipeline_fingerprint
from .tiny import build_small_pipeline, build_tiny_flux_pipeline, build_tiny_pipeline, build_tiny_sdxl_pipeline
from .tiny_sd3 import build_tiny_sd3_pipeline

TOY_DIRECTORY = Path(__file__).parent / "toy"  # trained by `lorafleet base train-toy`, committed


def _load_toy_pipeline():
    if not (TOY_DIRECTORY / "model_index.json").is_file():
        raise BaseModelError(f"the toy base's weights are missing from {TOY_DIRECTORY}; run `lorafleet base "
                             "train-toy`", field="base")
    return _load_diffusers_directory(TOY_DIRECTORY)


@dataclass(frozen=True)
class BuiltinBase:
    build: Callable[[], object]
    family: str  # its family's name, known without building it


BUILTIN_BASES: dict[str, BuiltinBase] = {
    "tiny": BuiltinBase(build_tiny_pipeline, "sd1"),  # plumbing tests: a few MB, random weights
    "small": BuiltinBase(build_small_pipeline, "sd1"),  # benchmarks: UNet 64/128/256, random weights
    "toy": BuiltinBase(_load_toy_pipeline, "sd1"),  # draws the toy world: trained weights (docs/toy-model-card.md)
    "tiny-sdxl": BuiltinBase(build_tiny_sdxl_pipeline, "sdxl"),  # SDXL plumbing tests: SDXL-shaped, random weights
    "tiny-flux": BuiltinBase(build_tiny_flux_pipeline, "flux"),  # Flux plumbing tests: Flux-shaped, random weights
    "tiny-sd3": BuiltinBase(build_tiny_sd3_pipeline, "sd3"),  # SD 3.5 plumbing tests: SD 3.5-shaped, random weights
}
DEFAULT_BASE = "tiny"


def _module_shapes(model: torch.nn.Module) -> dict[str, ModuleShape]:
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[name] = ModuleShape("linear", tuple(module.weight.shape))
        elif isinstance(module, torch.nn.Conv2d):
            shapes[name] = ModuleShape("conv", tuple(module.weight.shape))
    return shapes


def spec_from_pipeline(base_id: str, pipe, fingerprint: str | None = None) -> BaseSpec:
    family = family_of_pipeline(pipe)
    modules = {name: _module_shapes(getattr(pipe, name)) for name in family.lora_components}
    return BaseSpec(
        id=base_id,
        fingerprint=fingerprint or pipeline_fingerprint(pipe),
        modules=modules,
        parameters={
            family.denoiser: {k: tuple(v.shape) for k, v in getattr(pipe, family.denoiser).state_dict().items()},
        },
        text_hidden_size=int(pipe.text_encoder.config.hidden_size),
        vocabulary=frozenset(pipe.tokenizer.get_vocab()),
        family=family.name,
        kohya_names={name: family.kohya_names(pipe, name, paths) for name, paths in modules.items()},
        kohya_groups={name: groups for name in modules if (groups := family.kohya_groups(pipe, name))},
        text_hidden_sizes={name: int(getattr(pipe, name).config.hidden_size) for name in family.text_encoders},
    )


@dataclass
class LoadedBase:
    id: str
    pipeline: object
    fingerprint: str

    @property
    def family(self) -> ModelFamily:
        return family_of_pipeline(self.pipeline)

    def spec(self) -> BaseSpec:
        return spec_from_pipeline(self.id, self.pipeline, self.fingerprint)

    @property
    def native_size(self) -> int:
        """The image side (pixels) the base was built for, as its family reads it off the pipeline."""
        return self.family.native_size(self.pipeline)


def _model_index_family(path: Path) -> ModelFamily:
    if not (path / "model_index.json").is_file():
        raise BaseModelError(f"{path} is not a diffusers directory (no model_index.json)", field="base")
    try:
        class_name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError) as exc:
        raise BaseModelError(f"{path}/model_index.json is not a JSON object: {exc}", field="base") from exc
    return family_of_class_name(str(class_name))


def _load_diffusers_directory(path: Path):
    family = _model_index_family(path)
    try:
        pipe = family.load_pipeline_class().from_pretrained(
            str(path), local_files_only=True, use_safetensors=True, **family.load_options)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise BaseModelError(f"cannot load base model from {path}: {exc}", field="base") from exc
    return _frozen(pipe, family)


def _frozen(pipe, family: ModelFamily):
    pipe.set_progress_bar_config(disable=True)
    for module in family.models(pipe).values():
        module.eval().requires_grad_(False)
    return pipe


def family_of_base(base: str) -> ModelFamily:
    """A base's family without loading its weights: the built-in's, its model_index.json's, or its
    single-file checkpoint's keys."""
    if base in BUILTIN_BASES:
        return family_named(BUILTIN_BASES[base].family)
    path = Path(base).expanduser()
    if path.is_dir():
        return _model_index_family(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as checkpoint:
            return family_of_checkpoint_keys(checkpoint.keys())
    except (OSError, ValueError, RuntimeError) as exc:
        raise BaseModelError(f"cannot read the base {base!r}: {exc}", field="base") from exc


def _load_single_file(path: Path, base_config: str | None):
    """An original-layout (LDM/SGM) .safetensors checkpoint, with configs from ``base_config``."""
    from safetensors import safe_open

    if path.suffix.lower() != ".safetensors":
        raise BaseModelError(f"{path.name}: only .safetensors checkpoints are loaded (pickle formats can run "
                             "code)", field="base")
    try:
        with safe_open(str(path), framework="pt") as checkpoint:
            family = family_of_checkpoint_keys(checkpoint.keys())
        pipe = family.load_single_file(str(path), base_config)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise BaseModelError(f"cannot load single-file checkpoint {path}: {exc}", field="base") from exc
    return _frozen(pipe, family)


def _build_pipeline(base: str, base_config: str | None = None):
    if base in BUILTIN_BASES:
        return BUILTIN_BASES[base].build()
    path = Path(base).expanduser()
    if path.is_dir():
        return _load_diffusers_directory(path)
    if path.is_file():
        return _load_single_file(path, base_config)
    known = ", ".join(sorted(BUILTIN_BASES))
    raise BaseModelError(
        f"unknown base {base!r}: use a built-in base ({known}), a diffusers directory or a .safetensors "
        "checkpoint", field="base"
    )


def base_id(base: str) -> str:
    """The id recorded for a base: the built-in name, or the resolved path."""
    return base if base in BUILTIN_BASES else str(Path(base).expanduser().resolve())


def load_base(base: str = DEFAULT_BASE, base_config: str | None = None) -> LoadedBase:
    """A fresh pipeline for ``base`` (built-in name, diffusers directory, single file), on CPU."""
    pipe = _build_pipeline(base, base_config)
    return LoadedBase(id=base_id(base), pipeline=pipe, fingerprint=pipeline_fingerprint(pipe))


_SPEC_CACHE: dict[str, BaseSpec] = {}
_SPEC_LOCK = threading.Lock()


def base_spec(base: str = DEFAULT_BASE) -> BaseSpec:
    """The (cached) spec of a base; loads the base once per process."""
    key = base_id(base)
    with _SPEC_LOCK:
        if key not in _SPEC_CACHE:
            _SPEC_CACHE[key] = load_base(base).spec()
        return _SPEC_CACHE[key]


def export_base(base: str, destination: Path) -> LoadedBase:
    """Write ``base`` as an ordinary diffusers directory (safetensors weights)."""
    loaded = load_base(base)
    destination = Path(destination)
    if destination.exists() and any(destination.iterdir()):
        raise BaseModelError(f"destination {destination} exists and is not empty", field="destination")
    loaded.pipeline.save_pretrained(str(destination), safe_serialization=True)
    return loaded
