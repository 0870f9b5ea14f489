"""`lorafleet bench train`: training speed and memory, lorafleet vs a plain diffusers+peft loop.

Each variant runs in its own process so its peak RSS is its own. Same base (`small` unless
``--base``), batch, resolution and rank for both loops; the reference loop is the family's own
(noise prediction, or Flux's flow matching). Also: QLoRA's denoiser memory (UNet or transformer)
vs fp32, and the time to prepare 1,000 images.
"""

from __future__ import annotations

# Imports inside functions: every benchmark's arguments are added when the parser is built; its
# heavy imports wait for its run. Each run is a fresh process.
import resource
import tempfile
import time
from pathlib import Path

from lorafleet.devtools.shapes import write_shapes_folder

from . import in_fresh_process, positive_int


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _lorafleet_run(data: str, output: str, steps: int, batch: int, rank: int, base: str, queue) -> None:
    from lorafleet.training.config import DataConfig, LoraConfig, TrainConfig
    from lorafleet.training.loop import Trainer

    config = TrainConfig(data=DataConfig(path=Path(data), resolution=64), output_dir=Path(output), max_steps=steps,
                         batch_size=batch, lora=LoraConfig(rank=rank, alpha=rank), base=base)
    trainer = Trainer(config)
    trainer.step(0)  # warm-up outside the timing
    started = time.perf_counter()
    for step in range(1, steps + 1):
        trainer.step(step)
    elapsed = time.perf_counter() - started
    queue.put({"steps_per_s": steps / elapsed, "peak_rss_mb": _peak_rss_mb()})


def _reference_run(data: str, steps: int, batch: int, rank: int, base: str, queue) -> None:
    """What one writes directly with diffusers + peft, for comparison: the structure of diffusers'
    train_dreambooth_lora.py / _sdxl.py (noise prediction) or train_dreambooth_lora_flux.py (flow
    matching), with the same LoRA targets, batch and resolution as lorafleet's run."""
    import numpy as np
    import torch
    from peft import LoraConfig
    from PIL import Image

    from lorafleet.bases import load_base

    loaded = load_base(base)
    pipe = loaded.pipeline
    denoiser = getattr(pipe, loaded.family.denoiser)
    images = sorted(Path(data).glob("*.png"))
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((64, 64)), np.float32) / 127.5 - 1
                       for p in images]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        sample = pipe.vae.encode(torch.from_numpy(pixels)).latent_dist.sample()
        latents = (sample - (pipe.vae.config.shift_factor or 0.0)) * pipe.vae.config.scaling_factor
        conditioning = _reference_conditioning(pipe, batch)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    optimizer = torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=1e-4)
    loss = _flow_matching_loss if loaded.family.objective == "flow_matching" else _noise_prediction_loss

    def step():
        loss(pipe, latents[torch.randint(len(latents), (batch,))], conditioning).backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - started
    queue.put({"steps_per_s": steps / elapsed, "peak_rss_mb": _peak_rss_mb()})


def _noise_prediction_loss(pipe, latents, conditioning):
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    hidden, extra = conditioning
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (latents.shape[0],))
    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, t)
    return F.mse_loss(pipe.unet(noisy, t, hidden, **extra).sample, noise)


def _flow_matching_loss(pipe, latents, conditioning):
    """train_dreambooth_lora_flux.py's step: logit-normal sigmas, packed latents, guidance 1."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_density_for_timestep_sampling

    hidden, pooled = conditioning
    batch, channels, height, width = latents.shape
    noise = torch.randn_like(latents)
    sigmas = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=0.0, logit_std=1.0)
    noisy = (1 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
    packed = pipe._pack_latents(noisy, batch, channels, height, width)
    image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
    text_ids = torch.zeros(hidden.shape[1], 3)
    prediction = pipe.transformer(hidden_states=packed, timestep=sigmas, guidance=torch.ones(batch),
                                  pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=text_ids,
                                  img_ids=image_ids, return_dict=False)[0]
    scale = pipe.vae_scale_factor
    prediction = pipe._unpack_latents(prediction, height * scale, width * scale, scale)
    return F.mse_loss(prediction, noise - latents)


def _reference_conditioning(pipe, batch: int):
    """The prompt as the plain scripts encode it: SD 1.x's train_dreambooth_lora.py (one encoder),
    train_dreambooth_lora_sdxl.py (both encoders' penultimate states, pooled, add_time_ids), or
    train_dreambooth_lora_flux.py (T5 hidden states, CLIP pooled)."""
    import torch

    prompts = ["sks a photo"] * batch
    if type(pipe).__name__ == "FluxPipeline":
        embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=32)
        return embeds, pooled

    def ids(tokenizer):
        return tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids

    if getattr(pipe, "text_encoder_2", None) is None:
        return pipe.text_encoder(ids(pipe.tokenizer))[0], {}
    first = pipe.text_encoder(ids(pipe.tokenizer), output_hidden_states=True)
    second = pipe.text_encoder_2(ids(pipe.tokenizer_2), output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * batch, dtype=hidden.dtype)  # original, crop, target
    return hidden, {"added_cond_kwargs": {"text_embeds": second[0], "time_ids": time_ids}}


def _qlora_memory(base: str) -> dict:
    from lorafleet.bases import load_base
    from lorafleet.training.methods import quantize_linear_layers

    loaded = load_base(base)
    denoiser = getattr(loaded.pipeline, loaded.family.denoiser)
    before = sum(p.numel() * p.element_size() for p in denoiser.parameters())
    report = quantize_linear_layers(denoiser)
    return {"denoiser": loaded.family.denoiser, "fp32_mb": round(before / 1e6, 2),
            "nf4_mb": round((before - report["memory_saving_bytes"]) / 1e6, 2),
            "quantized_layers": report["quantized_layers"],
            "full_precision_layers": len(report["full_precision_layers"])}


def _prepare_seconds(count: int, workdir: Path) -> float:
    from lorafleet.training.config import DataConfig
    from lorafleet.training.data import prepare_folder

    folder = write_shapes_folder(workdir / "many", count, size=96)
    started = time.perf_counter()
    prepare_folder(DataConfig(path=folder, resolution=64), workdir / "prepared")
    return time.perf_counter() - started


def run_train_bench(base: str, steps: int, batch: int, rank: int, images: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="lorafleet-train-bench-") as tmp:
        workdir = Path(tmp)
        data = write_shapes_folder(workdir / "data", 16, size=64)
        ours = in_fresh_process(_lorafleet_run, str(data), str(workdir / "run"), steps, batch, rank, base)
        reference = in_fresh_process(_reference_run, str(data), steps, batch, rank, base)
        return {
            "base": base, "batch": batch, "rank": rank, "resolution": 64, "steps": steps,
            "lorafleet_steps_per_s": round(ours["steps_per_s"], 3),
            "reference_steps_per_s": round(reference["steps_per_s"], 3),
            "speed_ratio": round(ours["steps_per_s"] / reference["steps_per_s"], 3),
            "lorafleet_peak_rss_mb": round(ours["peak_rss_mb"], 1),
            "reference_peak_rss_mb": round(reference["peak_rss_mb"], 1),
            **{f"qlora_{k}": v for k, v in _qlora_memory(base).items()},
            f"prepare_{images}_images_s": round(_prepare_seconds(images, workdir), 2),
        }


def cmd_bench_train(args) -> int:
    from .registry_bench import emit

    result = run_train_bench(args.base, args.steps, args.batch, args.rank, args.images)
    return emit([result], transpose=True)


def add_arguments(parser) -> None:
    parser.add_argument("--base", default="small")
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument("--images", type=positive_int, default=1000)
    parser.set_defaults(handler=cmd_bench_train)
