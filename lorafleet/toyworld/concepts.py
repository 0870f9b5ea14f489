"""Measured concept learning on the `toy` base: train an adapter on a held-out concept with a trigger
word, publish it, serve it, generate and score — with and without the adapter.

One procedure for every method (the methods differ only in their training overrides); used by
the concept-learning tests and by `lorafleet bench concepts`.
"""

from __future__ import annotations

# Imports inside functions: training and serving only when a concept run starts (the concepts
# bench imports this module when its parser is built).
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from .base_model import BASE_SHAPES, HELD_OUT_COLOUR, HELD_OUT_SHAPE, base_scene, base_targets
from .scorer import hue_shift, score
from .world import caption, render, write_dataset

TRIGGER = "sks"
TI_TOKEN = "<sks>"
GUIDANCE = 4.0  # the guidance every toy-world run draws with
BASE_CHECK_PROMPTS = base_targets()  # every base colour x shape pairing: the drift check
COMMON = {"data": {"trigger_mode": "substitute", "cache_latents": True, "caption_dropout": 0.1},
          "batch_size": 8, "optimizer": {"warmup_steps": 20, "schedule": "cosine"}, "checkpoint_every": 0}
# Per method: training settings (the trigger binds the concept; `full` is the reference).
# All but textual inversion also get renders of the base's own concepts in the folder
# (regularization images): without them the update leaks into every prompt. The adapter methods
# train those rows (and DreamBooth its class images, and every row whose caption was dropped) toward
# the frozen base's own prediction (regularization.target=base), weighted 8x, and adapt only the
# cross-attention's keys and values (as Custom Diffusion does): that keeps the base prompts' accuracy
# and their hue within 5 degrees (`lorafleet bench concepts`, docs/toy-model-card.md).
REGULARIZED_METHODS = {"lora": 96, "dreambooth": 96, "qlora": 96, "full": 48}
BASE_TARGET = {"regularization": {"target": "base", "weight": 8}}
CROSS_ATTENTION_LORA = {"optimizer": {"learning_rate": 0.002}, **BASE_TARGET,
                        "lora": {"rank": 8, "alpha": 8, "target_modules": ["attn2.to_k", "attn2.to_v"]}}
METHODS: dict[str, dict] = {
    "lora": {"max_steps": 300, **CROSS_ATTENTION_LORA},
    "dreambooth": {"max_steps": 450, **CROSS_ATTENTION_LORA,
                   "dreambooth": {"class_prompt": "a circle", "num_class_images": 16, "class_image_steps": 20,
                                  "prior_loss_weight": 1.0}},
    "qlora": {"max_steps": 300, **CROSS_ATTENTION_LORA},
    "textual_inversion": {"max_steps": 300, "optimizer": {"learning_rate": 0.02},
                          "textual_inversion": {"token": TI_TOKEN, "init_word": "blue"}},
    "full": {"max_steps": 500, "optimizer": {"learning_rate": 0.001}},
}

# A held-out shape needs more than the cross-attention, and time: LoRA-type methods train every
# transformer projection and the ResNet convolutions at rank 16 for 2,400 steps (LoRA: 600 steps
# draw 19% stars, 1,200 50%, 2,400 81%; docs/toy-model-card.md). A convolution LoRA is served
# unbatched, through peft's layers, as the router cannot split it.
SHAPE_LORA = {"max_steps": 2400, "optimizer": {"learning_rate": 0.004},
              "lora": {"rank": 16, "alpha": 16,
                       "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                          "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]}}
CONCEPT_SETTINGS: dict[tuple[str, str], dict] = {
    (method, "shape"): SHAPE_LORA for method in ("lora", "dreambooth", "qlora")}


def _merged(*trees: dict) -> dict:
    """Later trees win, section by section (a section is a nested dict)."""
    merged: dict = {}
    for tree in trees:
        for key, value in tree.items():
            both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
            merged[key] = _merged(merged[key], value) if both_sections else value
    return merged


def concept_train_config(method: str, data: Path, output_dir: Path, *, concept: str, trigger: str, seed: int,
                         base: str, resolution: int, aliases: list[str] | None = None):
    """The recipe of ``method`` for ``concept`` on the toy world, as a validated ``TrainConfig``."""
    from lorafleet.training.config import TrainConfig

    run = {"method": method, "base": base, "seed": seed, "output_dir": output_dir,
           "data": {"path": data, "trigger": trigger, "resolution": resolution},
           "publish": {"aliases": list(aliases or [])}}
    recipe = _merged(run, COMMON, METHODS[method], CONCEPT_SETTINGS.get((method, concept), {}))
    return TrainConfig.model_validate(recipe)


@dataclass
class ConceptResult:
    method: str
    concept: str
    images: int
    train_seconds: float
    target_without: float  # accuracy on the concept's prompts, base alone
    target_with: float  # ... with the adapter
    base_without: float  # both-right accuracy on base prompts, base alone
    base_with: float  # ... with the adapter loaded (language drift)
    hue_drift_mean: float = 0.0  # degrees the base prompts' hues move with the adapter loaded (mean over prompts)
    hue_drift_max: float = 0.0  # ... the prompt moved most
    digest: str = ""
    hue_drift: dict = field(default_factory=dict)  # base prompt -> degrees
    per_prompt: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict, repr=False)  # concept prompt -> the images drawn with the adapter

    @property
    def retained(self) -> float:
        return self.base_with / self.base_without if self.base_without else 0.0


def concept_dataset(folder: Path, concept: str, count: int = 16, seed: int = 5, regularization: int = 0,
                    size: int = 32) -> tuple[Path, dict]:
    """Images (``size`` px) of a held-out colour (or shape) with the concept's word replaced by the
    trigger, plus ``regularization`` renders of the base's own concepts with their plain captions."""
    if concept == "colour":
        write_dataset(folder, count, seed=seed, size=size, shapes=BASE_SHAPES, colours=[HELD_OUT_COLOUR],
                      detail="short")
        word = HELD_OUT_COLOUR
    else:
        write_dataset(folder, count, seed=seed, size=size, shapes=[HELD_OUT_SHAPE], colours=["red", "blue", "yellow"],
                      detail="short")
        word = HELD_OUT_SHAPE
    for text_file in folder.glob("*.txt"):
        text_file.write_text(text_file.read_text().replace(word, "[trigger]"))
    write_regularization_renders(folder, regularization, seed + 1, size)
    return folder, _targets(concept)


def write_regularization_renders(folder: Path, count: int, seed: int, size: int = 32) -> None:
    """``count`` renders of the base's own concepts with their plain captions ("a red circle"): rows
    without [trigger], so regularization examples."""
    rng = random.Random(seed)
    for index in range(count):
        scene = base_scene(rng)
        Image.fromarray(render(scene, size)).save(folder / f"regularization-{index:03d}.png")
        (folder / f"regularization-{index:03d}.txt").write_text(caption(scene, "short"))


def _targets(concept: str) -> dict[str, tuple[str | None, str | None]]:
    """Prompts (with the trigger word) -> what a right image shows (None: anything)."""
    if concept == "colour":
        return {f"a [trigger] {shape}": (HELD_OUT_COLOUR, None) for shape in BASE_SHAPES}
    return {f"a {colour} [trigger]": (colour, HELD_OUT_SHAPE) for colour in ("red", "blue")}


def accuracy(images_by_prompt: dict[str, list[np.ndarray]], targets: dict) -> tuple[float, dict]:
    right = total = 0
    per_prompt = {}
    for prompt, images in images_by_prompt.items():
        want_colour, want_shape = targets[prompt]
        verdicts = [score(image) for image in images]
        hits = [(want_colour is None or v.colour == want_colour) and (want_shape is None or v.shape == want_shape)
                for v in verdicts]
        per_prompt[prompt] = sum(hits) / len(hits)
        right += sum(hits)
        total += len(hits)
    return right / total, per_prompt


@dataclass
class TrainedConcept:
    manifest: object  # the published Manifest
    prompts: dict  # prompt (trigger filled in) -> (colour, shape) a right image shows
    images: int
    train_seconds: float
    payload: object = None  # the trained AdapterPayload


def train_and_publish(method: str, workdir: Path, registry, concept: str = "colour", name: str | None = None,
                      train_seed: int = 0, aliases: list[str] | None = None, trigger: str | None = None,
                      base: str = "toy") -> TrainedConcept:
    """Train ``method`` on the held-out ``concept`` (≤20 images, a trigger word) over ``base`` (the
    toy base or one trained by `train-toy --out`) and publish it."""
    from lorafleet.bases import load_base
    from lorafleet.training.loop import train
    from lorafleet.training.publish import publish_result

    workdir = Path(workdir)
    regularization = REGULARIZED_METHODS.get(method, 0)
    size = load_base(base).native_size
    data, targets = concept_dataset(workdir / "data", concept, regularization=regularization, size=size)
    trigger = trigger or (TI_TOKEN if method == "textual_inversion" else TRIGGER)
    config = concept_train_config(method, data, workdir / "run", concept=concept, trigger=trigger, seed=train_seed,
                                  base=base, resolution=size, aliases=aliases)
    started = time.perf_counter()
    result = train(config)
    train_seconds = time.perf_counter() - started
    manifest = publish_result(result, config, registry, name or f"toy-{concept}-{method.replace('_', '-')}")
    prompts = {p.replace("[trigger]", trigger): t for p, t in targets.items()}
    concept_images = len(list(data.glob("*.png"))) - regularization
    return TrainedConcept(manifest, prompts, concept_images, round(train_seconds, 1), result.payload)


def measure(without, with_adapter, prompts: dict, seeds: int) -> dict:
    """Accuracies without and with the adapter (each a generate(prompt, n) callable) on the concept's
    prompts and on the base's own prompts, and how far the adapter moves each base prompt's hue."""
    target_without, _ = accuracy({p: without(p, seeds) for p in prompts}, prompts)
    samples = {p: with_adapter(p, seeds) for p in prompts}
    target_with, per_prompt = accuracy(samples, prompts)
    base_images = {p: without(p, seeds) for p in BASE_CHECK_PROMPTS}
    adapted_images = {p: with_adapter(p, seeds) for p in BASE_CHECK_PROMPTS}
    base_without, _ = accuracy(base_images, BASE_CHECK_PROMPTS)
    base_with, _ = accuracy(adapted_images, BASE_CHECK_PROMPTS)
    return {"target_without": target_without, "target_with": target_with, "base_without": base_without,
            "base_with": base_with, "per_prompt": per_prompt, "samples": samples,
            **hue_drift(base_images, adapted_images)}


def hue_drift(without: dict[str, list], with_adapter: dict[str, list]) -> dict:
    """Per base prompt, degrees between its mean foreground hue without and with the adapter (same
    seeds); their mean and max. Class accuracy ("retained") hides shifts that users see."""
    shifts = {p: hue_shift(without[p], with_adapter[p]) for p in without}
    measured = {p: round(shift, 2) for p, shift in shifts.items() if shift is not None}
    values = list(measured.values()) or [0.0]
    return {"hue_drift": measured, "hue_drift_mean": float(np.mean(values)), "hue_drift_max": float(np.max(values))}


def learn_concept(method: str, workdir: Path, concept: str = "colour", seeds: int = 8, train_seed: int = 0,
                  base: str = "toy") -> ConceptResult:
    """Train ``method`` on the held-out ``concept``, publish, serve (HTTP, in-process) and score."""
    from lorafleet.registry import AdapterRegistry

    workdir = Path(workdir)
    registry = AdapterRegistry(f"file://{workdir / 'registry'}")
    trained = train_and_publish(method, workdir, registry, concept, train_seed=train_seed, base=base)
    if method == "full":  # a full UNet is served as its own base, next to the original
        fine_tuned = _full_unet_as_base(trained.payload, workdir / "full-base", base)
        with _served(registry, workdir / "base", base) as original, \
                _served(registry, workdir / "tuned", fine_tuned) as tuned:
            figures = measure(lambda p, n: original(p, None, n), lambda p, n: tuned(p, None, n), trained.prompts,
                              seeds)
    else:
        ref = f"{trained.manifest.name}@{trained.manifest.version}"
        with _served(registry, workdir, base) as served:
            figures = measure(lambda p, n: served(p, None, n), lambda p, n: served(p, ref, n), trained.prompts,
                              seeds)
    return ConceptResult(method, concept, trained.images, trained.train_seconds, digest=trained.manifest.digest,
                         **figures)


COMPOSE_TRIGGERS = {"colour": "sks", "shape": "zwx"}  # one trigger word per adapter


def compose_concepts(method: str, workdir: Path, seeds: int = 8, base: str = "toy") -> dict:
    """A colour adapter (cyan, "sks") and a shape adapter (star, "zwx") trained apart, then named
    together in one request for "a sks zwx": how often is the image a cyan star?"""
    from lorafleet.registry import AdapterRegistry

    workdir = Path(workdir)
    registry = AdapterRegistry(f"file://{workdir / 'registry'}")
    refs = {}
    for concept, trigger in COMPOSE_TRIGGERS.items():
        trained = train_and_publish(method, workdir / concept, registry, concept, name=f"compose-{concept}",
                                    trigger=trigger, base=base)
        refs[concept] = f"{trained.manifest.name}@{trained.manifest.version}"
    prompt = f"a {COMPOSE_TRIGGERS['colour']} {COMPOSE_TRIGGERS['shape']}"
    want = {prompt: (HELD_OUT_COLOUR, HELD_OUT_SHAPE)}
    colour_only = {prompt: (HELD_OUT_COLOUR, None)}
    shape_only = {prompt: (None, HELD_OUT_SHAPE)}
    with _served(registry, workdir, base) as served:
        images = {prompt: served(prompt, [refs["colour"], refs["shape"]], seeds)}
        alone = {concept: {prompt: served(prompt, [ref], seeds)} for concept, ref in refs.items()}
    return {"method": method, "prompt": prompt, "both": accuracy(images, want)[0],
            "colour_right": accuracy(images, colour_only)[0], "shape_right": accuracy(images, shape_only)[0],
            "colour_adapter_alone_colour_right": accuracy(alone["colour"], colour_only)[0],
            "shape_adapter_alone_shape_right": accuracy(alone["shape"], shape_only)[0]}


def generate_over_http(client, prompt: str, ref: str | list[str] | None, count: int, seed: int = 1000) \
        -> list[np.ndarray]:
    """``count`` images from a lorafleet server (an httpx or test client) as float arrays; ``ref``
    one adapter ref or several (all at weight 1)."""
    from lorafleet.serve.service import decode_npy

    body = {"prompt": prompt, "seed": seed, "num_images": count, "steps": 20, "guidance_scale": GUIDANCE,
            "output_format": "npy"}
    if isinstance(ref, list):
        body["adapters"] = [{"ref": r, "weight": 1.0} for r in ref]
    elif ref:
        body["adapter"] = ref
    response = client.post("/v1/generate", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"generation failed: {response.status_code} {response.text[:300]}")
    return [decode_npy(b) for b in response.json()["images"]]


def _full_unet_as_base(payload, directory: Path, base: str) -> str:
    """``base`` with a fully fine-tuned UNet, written as a diffusers directory."""
    from lorafleet.bases import load_base

    pipe = load_base(base).pipeline
    pipe.unet.load_state_dict({key.removeprefix("unet."): tensor for key, tensor in payload.tensors.items()})
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return str(directory)


@contextmanager
def _served(registry, workdir: Path, base: str = "toy"):
    """The toy base served in this process over loopback HTTP (a real server and replica, no Ray):
    generate(prompt, ref, n)."""

    from lorafleet.local_cluster import free_port
    from lorafleet.serve.server import serving_in_thread
    from lorafleet.serve.settings import ServeSettings

    settings = ServeSettings(base=base, registry=registry.uri, cache={"disk_dir": str(workdir / "cache")},
                             limits={"max_num_images": 8}, host="127.0.0.1", port=free_port())
    with serving_in_thread(settings, registry) as url, httpx.Client(base_url=url, timeout=600) as client:
        yield lambda prompt, ref, count: generate_over_http(client, prompt, ref, count)
