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


def build_text_encoder_with_projection(tokenizer, text_config: dict):
    """CLIPTextModelWithProjection (SDXL's second encoder, SD 3's both): hidden states and a projected pooled one."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **text_config))


def frozen_from_seed(seed: int, builders: dict) -> dict[str, torch.nn.Module]:
    """Modules built in the given order from a fixed seed (identical on every build; the global
    random state is restored after), in eval mode with no gradients: a base's frozen weights."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        modules = {name: build() for name, build in builders.items()}
    finally:
        torch.random.set_rng_state(generator_state)
    for module in modules.values():
        module.eval().requires_grad_(False)
    return modules


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
    models = frozen_from_seed(seed, {"unet": lambda: UNet2DConditionModel(**unet_config),
                                     "vae": lambda: AutoencoderKL(**vae_config),
                                     "text_encoder": lambda: build_text_encoder(tokenizer, text_config)})
    return assemble_pipeline(models["vae"], models["text_encoder"], tokenizer, models["unet"], SCHEDULER_CONFIG)


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

    tokenizer = build_tokenizer(list(TINY_WORDS), model_max_length=TEXT_CONFIG["max_position_embeddings"])
    tokenizer_2 = build_tokenizer(list(TINY_WORDS), model_max_length=TEXT_CONFIG["max_position_embeddings"])
    models = frozen_from_seed(TINY_SDXL_SEED, {
        "unet": lambda: UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG),
        "vae": lambda: AutoencoderKL(**TINY_SDXL_VAE_CONFIG),
        "text_encoder": lambda: build_text_encoder(tokenizer, TEXT_CONFIG),
        "text_encoder_2": lambda: build_text_encoder_with_projection(tokenizer_2, TINY_SDXL_TEXT_2_CONFIG)})
    pipe = StableDiffusionXLPipeline(
        **models, tokenizer=tokenizer, tokenizer_2=tokenizer_2, force_zeros_for_empty_prompt=True,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG), add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# `tiny-flux`: a Flux-shaped pipeline with random weights (plumbing tests of the Flux family).
# Same component structure as Flux-dev: a FluxTransformer2DModel with double- and single-stream
# blocks and a guidance embedding, CLIPTextModel (pooled) + T5EncoderModel (hidden states; gated-GELU
# as T5 v1.1), a CLIP and a T5 tokenizer built here, a 16-channel AutoencoderKL with shift and scale
# and Flux's 8x downsampling (so sides are multiples of 16 px, as real Flux's), the flow-matching
# Euler scheduler with resolution-dependent shift.
TINY_FLUX_SEED = 20261201
TINY_FLUX_IMAGE_SIZE = 64  # pixels: 8x8x16 latents, 4x4 = 16 packed tokens
TINY_FLUX_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels x 2x2 packing
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,  # inner width 64: NF4-eligible on CPU, as real Flux's 3072 is
    joint_attention_dim=32,  # T5's d_model
    pooled_projection_dim=32,  # CLIP's hidden size
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),  # sums to the head dimension, as (16, 56, 56) does for 128
)
TINY_FLUX_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 16, 32, 32],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=8,
    sample_size=TINY_FLUX_IMAGE_SIZE,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.1159,
    scaling_factor=0.3611,
)
TINY_FLUX_T5_CONFIG = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                           feed_forward_proj="gated-gelu")
FLUX_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                             max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def build_t5_encoder(tokenizer, t5_config: dict):
    """A T5 encoder (ids 0 pad, 1 end, as T5's own vocabulary)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                   **t5_config))


def build_tiny_flux_pipeline():
    """The `tiny-flux` base: Flux-shaped, random weights, identical on every build."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from .vocabulary import build_t5_tokenizer

    tokenizer = build_tokenizer(list(TINY_WORDS), model_max_length=TEXT_CONFIG["max_position_embeddings"])
    tokenizer_2 = build_t5_tokenizer(list(TINY_WORDS), model_max_length=32)
    models = frozen_from_seed(TINY_FLUX_SEED, {
        "transformer": lambda: FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER_CONFIG),
        "vae": lambda: AutoencoderKL(**TINY_FLUX_VAE_CONFIG),
        "text_encoder": lambda: build_text_encoder(tokenizer, TEXT_CONFIG),
        "text_encoder_2": lambda: build_t5_encoder(tokenizer_2, TINY_FLUX_T5_CONFIG)})
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG), tokenizer=tokenizer,
                        tokenizer_2=tokenizer_2, **models)
    pipe.set_progress_bar_config(disable=True)
    return pipe
