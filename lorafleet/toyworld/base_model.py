"""The `toy` base: a Stable Diffusion-shaped model that really draws the toy world.

Recipe (`lorafleet base train-toy`, reproducible from a seed, CPU):
1. A word-level CLIPTokenizer over the world's words and a frozen, randomly initialised
   CLIPTextModel (enough conditioning for a vocabulary of ~30 words).
2. An AutoencoderKL trained on *broad* data: random hues, every shape (held-out ones too), as
   Stable Diffusion's VAE is trained on far more than its UNet's captions; otherwise no adapter
   could ever produce a held-out concept.
3. A UNet2DConditionModel trained on the base concepts only (epsilon prediction, DDPM noise,
   caption dropout for classifier-free guidance), the held-out concepts left for adapters.
"""

from __future__ import annotations

# Imports inside functions: diffusers only when the toy base is trained.
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorafleet.bases.tiny import SCHEDULER_CONFIG, assemble_pipeline, build_text_encoder
from lorafleet.bases.vocabulary import build_tokenizer

from .world import COLOUR_HUES, PLACES, SHAPES, SIZES, Scene, caption, render, sample_scene

TOY_IMAGE_SIZE = 32  # the committed base; `train-toy --resolution 64` trains a 64 px one (16x16 latents)
TOY_RESOLUTIONS = (32, 64)
TOY_SEED = 20261124
HELD_OUT_COLOUR = "cyan"
HELD_OUT_SHAPE = "star"
HELD_OUT_PAIR = ("green", "triangle")
TRIGGER_WORDS = ("sks", "zwx")  # rare words adapters can bind to a concept
TOY_WORDS = ("a", "on", "the", "in", *SIZES, *PLACES, *COLOUR_HUES, *SHAPES, *TRIGGER_WORDS)
BASE_COLOURS = tuple(c for c in COLOUR_HUES if c != HELD_OUT_COLOUR)
BASE_SHAPES = tuple(s for s in SHAPES if s != HELD_OUT_SHAPE)

TOY_TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=16, projection_dim=64)
TOY_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                      up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 64], layers_per_block=1,
                      latent_channels=4, norm_num_groups=8, sample_size=TOY_IMAGE_SIZE)
TOY_UNET_CONFIG = dict(sample_size=TOY_IMAGE_SIZE // 4, in_channels=4, out_channels=4,
                       down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                       up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                       block_out_channels=[32, 64, 64], layers_per_block=1, cross_attention_dim=64,
                       attention_head_dim=4, norm_num_groups=8)


@dataclass
class ToyRecipe:
    seed: int = TOY_SEED
    vae_steps: int = 1200
    vae_batch: int = 64
    vae_lr: float = 1e-3
    unet_steps: int = 2000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    dataset_size: int = 12000  # base-concept scenes the UNet trains on (latents precomputed)
    threads: int = 2
    image_size: int = TOY_IMAGE_SIZE  # pixels; the VAE downsamples 4x, so the UNet sees image_size / 4
    timings: dict = field(default_factory=dict)


def is_base_concept(scene: Scene) -> bool:
    return (scene.colour in BASE_COLOURS and scene.shape in BASE_SHAPES
            and (scene.colour, scene.shape) != HELD_OUT_PAIR)


def base_scene(rng: random.Random) -> Scene:
    while True:
        scene = sample_scene(rng, BASE_SHAPES, BASE_COLOURS)
        if is_base_concept(scene):
            return scene


def broad_scene(rng: random.Random) -> Scene:
    """Any shape, any hue (not only the palette's), for the VAE."""
    scene = sample_scene(rng)
    hue_colour = rng.choice(list(COLOUR_HUES))
    return Scene(scene.shape, hue_colour, scene.cx, scene.cy, scene.radius, scene.background, scene.texture_seed,
                 scene.saturation, scene.value)


def _broad_batch(rng: random.Random, count: int, size: int) -> torch.Tensor:
    images = []
    for _ in range(count):
        scene = broad_scene(rng)
        image = render(scene, size).astype(np.float32) / 255
        if rng.random() < 0.5:  # shift the hue anywhere on the wheel: broad colour coverage
            image = _rotate_hue(image, rng.uniform(0, 360))
        images.append(image)
    return _to_model(np.stack(images))


def _rotate_hue(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate hues about the grey axis (Rodrigues), keeping greys grey."""
    theta = math.radians(degrees)
    axis = np.ones(3) / math.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = math.cos(theta) * np.eye(3) + math.sin(theta) * cross + (1 - math.cos(theta)) * np.outer(axis, axis)
    return np.clip(image @ rotation.T, 0, 1).astype(np.float32)


def _to_model(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous() * 2 - 1


def _rendered(scenes: list[Scene], size: int) -> torch.Tensor:
    return _to_model(np.stack([render(s, size).astype(np.float32) / 255 for s in scenes]))


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_untrained(seed: int, image_size: int = TOY_IMAGE_SIZE):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tokenizer = build_tokenizer(list(TOY_WORDS), model_max_length=TOY_TEXT_CONFIG["max_position_embeddings"])
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(tokenizer, TOY_TEXT_CONFIG).eval().requires_grad_(False)
    vae = AutoencoderKL(**{**TOY_VAE_CONFIG, "sample_size": image_size})
    unet = UNet2DConditionModel(**{**TOY_UNET_CONFIG, "sample_size": image_size // 4})
    return tokenizer, text_encoder, vae, unet


def train_vae(vae, recipe: ToyRecipe, log=print) -> dict:
    rng = random.Random(recipe.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    vae.train().requires_grad_(True)
    started = time.perf_counter()
    for step in range(recipe.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.vae_lr * _cosine_lr(step, recipe.vae_steps, recipe.warmup_steps)
        batch = _broad_batch(rng, recipe.vae_batch, recipe.image_size)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == recipe.vae_steps - 1:
            log(f"vae step {step}: loss {loss.item():.5f} ({time.perf_counter() - started:.0f}s)")
    vae.eval().requires_grad_(False)
    return {"vae_seconds": round(time.perf_counter() - started, 1), "vae_final_loss": round(loss.item(), 6)}


def psnr(vae, scenes: list[Scene], size: int = TOY_IMAGE_SIZE) -> float:
    images = _rendered(scenes, size)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    mse = torch.mean(((decoded - images) / 2) ** 2).item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def _encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def train_unet(unet, vae, tokenizer, text_encoder, recipe: ToyRecipe, log=print) -> dict:
    from diffusers import DDPMScheduler

    rng = random.Random(recipe.seed + 2)
    scenes = [base_scene(rng) for _ in range(recipe.dataset_size)]
    started = time.perf_counter()
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(scenes), 256):
            chunk = scenes[start:start + 256]
            images = _rendered(chunk, recipe.image_size)
            posterior = vae.encode(images).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    means, stds = torch.cat(means), torch.cat(stds)
    # Like Stable Diffusion (and the adapter trainer): the UNet sees posterior *samples*, scaled to unit variance.
    scaling = float(1.0 / torch.sqrt(means.var() + stds.pow(2).mean()))
    vae.register_to_config(scaling_factor=scaling)
    captions = [caption(s, rng.choice(["full", "short"])) for s in scenes]
    unique = sorted(set(captions)) + [""]
    embeddings = _encode_prompts(tokenizer, text_encoder, unique)
    index_of = {text: i for i, text in enumerate(unique)}
    caption_index = torch.tensor([index_of[c] for c in captions])
    log(f"encoded {len(scenes)} scenes and {len(unique)} captions in {time.perf_counter() - started:.0f}s")

    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items()
                                       if k not in ("set_alpha_to_one",)})
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=1e-2)
    unet.train().requires_grad_(True)
    generator = torch.Generator().manual_seed(recipe.seed + 3)
    started = time.perf_counter()
    for step in range(recipe.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.unet_lr * _cosine_lr(step, recipe.unet_steps, recipe.warmup_steps)
        rows = torch.randint(0, len(scenes), (recipe.unet_batch,), generator=generator)
        mean = means[rows]
        clean = (mean + stds[rows] * torch.randn(mean.shape, generator=generator)) * scaling
        text_rows = caption_index[rows].clone()
        dropped = torch.rand(recipe.unet_batch, generator=generator) < recipe.caption_dropout
        text_rows[dropped] = index_of[""]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (recipe.unet_batch,),
                                  generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=embeddings[text_rows]).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == recipe.unet_steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)")
    unet.eval().requires_grad_(False)
    return {"unet_seconds": round(time.perf_counter() - started, 1), "unet_final_loss": round(loss.item(), 5),
            "latent_scaling_factor": round(scaling, 5)}


def train_toy_base(output: Path, recipe: ToyRecipe | None = None, log=print, vae_from: Path | None = None) -> dict:
    """Train the toy base from scratch and save it as a diffusers directory at ``output``."""
    recipe = recipe or ToyRecipe()
    torch.set_num_threads(recipe.threads)
    if recipe.image_size not in TOY_RESOLUTIONS:
        raise ValueError(f"image_size must be one of {TOY_RESOLUTIONS}, not {recipe.image_size}")
    tokenizer, text_encoder, vae, unet = build_untrained(recipe.seed, recipe.image_size)
    if vae_from is not None:  # a VAE trained by this recipe's first stage (deterministic from the seed)
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(vae_from)).eval().requires_grad_(False)
    report = {"recipe": {k: v for k, v in asdict(recipe).items() if k != "timings"},
              "parameters": {"unet": sum(p.numel() for p in unet.parameters()),
                             "vae": sum(p.numel() for p in vae.parameters()),
                             "text_encoder": sum(p.numel() for p in text_encoder.parameters())}}
    if vae_from is None:
        report.update(train_vae(vae, recipe, log))
    else:
        report["vae_from"] = str(vae_from)
    rng = random.Random(recipe.seed + 4)
    size = recipe.image_size
    report["vae_psnr_db"] = {
        "base_concepts": round(psnr(vae, [base_scene(rng) for _ in range(256)], size), 2),
        "held_out_colour": round(psnr(vae, [sample_scene(rng, colours=[HELD_OUT_COLOUR]) for _ in range(256)], size),
                                 2),
        "held_out_shape": round(psnr(vae, [sample_scene(rng, shapes=[HELD_OUT_SHAPE]) for _ in range(256)], size), 2),
    }
    log(f"vae psnr {report['vae_psnr_db']}")
    report.update(train_unet(unet, vae, tokenizer, text_encoder, recipe, log))
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, SCHEDULER_CONFIG)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(output), safe_serialization=True)
    return report


def base_targets() -> dict[str, tuple[str, str]]:
    """Prompts for every base colour x shape pairing the base was trained on."""
    return {f"a {c} {s}": (c, s) for c in BASE_COLOURS for s in BASE_SHAPES if (c, s) != HELD_OUT_PAIR}


def held_out_targets() -> dict[str, dict[str, tuple[str, str]]]:
    return {
        "colour": {f"a {HELD_OUT_COLOUR} {s}": (HELD_OUT_COLOUR, s) for s in BASE_SHAPES},
        "shape": {f"a {c} {HELD_OUT_SHAPE}": (c, HELD_OUT_SHAPE) for c in ("red", "blue", "yellow")},
        "pair": {f"a {HELD_OUT_PAIR[0]} {HELD_OUT_PAIR[1]}": HELD_OUT_PAIR},
    }
