"""`tiny`: a Stable Diffusion 1.x-shaped pipeline with random weights, built from configs.

Same component structure as SD 1.x (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer, DDIM scheduler), small enough to build in well under a second on a CPU.
It draws noise-like images: it exists to test plumbing, deterministically.
"""

from __future__ import annotations

# Imports inside functions: diffusers and transformers only when a built-in base is built.
import torch

from .vocabulary import build_tokenizer

TINY_SEED = 20261122
TINY_IMAGE_SIZE = 32  # pixels; the VAE downsamples x4 -> 8x8x4 latents

TINY_WORDS = (
    "a an the of in on at with and photo picture drawing painting style portrait image "
    "red orange yellow green cyan blue purple magenta pink white black gray grey brown "
    "circle square triangle star cross ring heart diamond shape shapes "
    "small large big tiny left right top bottom center middle background "
    "cat dog person man woman house tree car flower sky sea mountain city"
).split()

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[16, 32, 32],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=TINY_IMAGE_SIZE,
)

UNET_CONFIG = dict(
    sample_size=TINY_IMAGE_SIZE // 4,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)

TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=32,
    projection_dim=32,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def build_text_encoder(tokenizer, text_config: dict):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **text_config,
    )
    return CLIPTextModel(config)


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler_config: dict):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_from_configs(seed: int, unet_config: dict, vae_config: dict, text_config: dict):
    """A pipeline with random weights from configs, identical on every build (fixed seed and order)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tokenizer = build_tokenizer(list(TINY_WORDS), model_max_length=text_config["max_position_embeddings"])
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = build_text_encoder(tokenizer, text_config)
    finally:
        torch.random.set_rng_state(generator_state)
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return assemble_pipeline(vae, text_encoder, tokenizer, unet, SCHEDULER_CONFIG)


def build_tiny_pipeline():
    """The `tiny` base (plumbing tests, the default)."""
    return build_from_configs(TINY_SEED, UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG)


# `small`: the benchmark configuration (UNet block_out_channels 64/128/256), random weights,
# 64x64 images. Big enough that LoRA work is a realistic share of a step.
SMALL_IMAGE_SIZE = 64
SMALL_SEED = 20261123
SMALL_VAE_CONFIG = {**VAE_CONFIG, "block_out_channels": [32, 64, 64], "sample_size": SMALL_IMAGE_SIZE}
SMALL_UNET_CONFIG = dict(
    sample_size=SMALL_IMAGE_SIZE // 4,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[64, 128, 256],
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
SMALL_TEXT_CONFIG = {**TEXT_CONFIG, "hidden_size": 64, "intermediate_size": 128, "projection_dim": 64}


def build_small_pipeline():
    """The `small` base (benchmarks): same structure as `tiny`, larger UNet."""
    return build_from_configs(SMALL_SEED, SMALL_UNET_CONFIG, SMALL_VAE_CONFIG, SMALL_TEXT_CONFIG)


# `tiny-sdxl`: an SDXL-shaped pipeline with random weights (plumbing tests of the SDXL family).
# Same component structure as SDXL: a UNet with text-time added conditioning and linear
# projections, CLIPTextModel + a wider CLIPTextModelWithProjection (hidden states concatenated:
# 32 + 64; the widths differ, as real SDXL's 768 and 1280 do, which single-file loading relies on),
# two tokenizers, the Euler scheduler; real SDXL's layout of levels (no attention on the first
# down and last up level, two layers per block) so that its SGM and kohya names are the real ones.
TINY_SDXL_SEED = 20261130
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=TINY_IMAGE_SIZE // 4,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2],
    attention_head_dim=[2, 4],
    cross_attention_dim=32 + 64,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 64,  # six size numbers x 8, plus the pooled text (64)
    norm_num_groups=8,
)
TINY_SDXL_TEXT_2_CONFIG = {**TEXT_CONFIG, "hidden_size": 64, "intermediate_size": 128, "projection_dim": 64}
TINY_SDXL_VAE_CONFIG = {**VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


def build_tiny_sdxl_pipeline():
    """The `tiny-sdxl` base: SDXL-shaped, random weights, identical on every build."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = build_tokenizer(list(TINY_WORDS), model_max_length=TEXT_CONFIG["max_position_embeddings"])
    tokenizer_2 = build_tokenizer(list(TINY_WORDS), model_max_length=TEXT_CONFIG["max_position_embeddings"])
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(TINY_SDXL_SEED)
        unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG)
        vae = AutoencoderKL(**TINY_SDXL_VAE_CONFIG)
        text_encoder = build_text_encoder(tokenizer, TEXT_CONFIG)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer_2), bos_token_id=tokenizer_2.bos_token_id, eos_token_id=tokenizer_2.eos_token_id,
            pad_token_id=tokenizer_2.pad_token_id, **TINY_SDXL_TEXT_2_CONFIG))
    finally:
        torch.random.set_rng_state(generator_state)
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
