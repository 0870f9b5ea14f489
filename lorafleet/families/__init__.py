"""Model families: everything that differs between SD 1.x-, SDXL-, Flux- and SD 3.5-shaped bases,
one module per family, which bases, the registry, serving and training ask.

A family names its diffusers pipeline class, its denoiser and text-encoder components (and so
what a LoRA may target), how it is recognised (``model_index.json``, checkpoint keys, a loaded
pipeline), its native resolution, how a prompt becomes the denoiser's conditioning, and its
kohya/A1111 LoRA naming. ``FAMILIES`` is the table; adding a family is one module and one row.
"""

from __future__ import annotations

from .base import (
    BatchShape,
    Conditioning,
    ImageSpec,
    ModelFamily,
    Noised,
    ObjectiveOptions,
    TrainingObjective,
    UnknownFamily,
)
from .flux import FLUX
from .sd1 import SD1
from .sd3 import SD3
from .sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD1, SDXL, FLUX, SD3)}

ALL_LORA_COMPONENTS: tuple[str, ...] = tuple(dict.fromkeys(
    component for family in FAMILIES.values() for component in family.lora_components))
"""Every component name a LoRA file may carry, in any family (diffusers' key prefixes)."""


def family_named(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownFamily(f"unknown model family {name!r}: one of {', '.join(FAMILIES)}", field="family") from None


def family_of_pipeline(pipe) -> ModelFamily:
    """The family of a loaded diffusers pipeline (by its class)."""
    return family_of_class_name(type(pipe).__name__)


def family_of_class_name(class_name: str) -> ModelFamily:
    """The family whose pipeline class (or an image-to-image/inpaint sibling) is ``class_name``."""
    for family in FAMILIES.values():
        if family.recognises_pipeline_class(class_name):
            return family
    raise UnknownFamily(f"no supported model family uses the pipeline {class_name!r} "
                        f"(supported: {', '.join(f.title for f in FAMILIES.values())})", field="base")


def family_of_checkpoint_keys(keys) -> ModelFamily:
    """The family of an original-layout (LDM/SGM) single-file checkpoint, from its keys."""
    keys = set(keys)
    for family in FAMILIES.values():
        if family.recognises_checkpoint(keys):
            return family
    raise UnknownFamily("the checkpoint's keys match no supported model family", field="base")


def families_with_components(components) -> list[ModelFamily]:
    """The families whose LoRA components include every one of ``components``."""
    return [family for family in FAMILIES.values() if set(components) <= set(family.lora_components)]


__all__ = ["ALL_LORA_COMPONENTS", "FAMILIES", "BatchShape", "Conditioning", "ImageSpec", "ModelFamily", "Noised",
           "ObjectiveOptions", "TrainingObjective", "UnknownFamily",
           "families_with_components", "family_named", "family_of_checkpoint_keys", "family_of_class_name",
           "family_of_pipeline"]
