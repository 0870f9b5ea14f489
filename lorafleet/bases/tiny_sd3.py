"""`tiny-sd3`: a Stable Diffusion 3.5-shaped pipeline with random weights (plumbing tests of the SD3
family). Same component structure as SD 3.5 Medium: an SD3Transformer2DModel with a dual-attention
(MMDiT-X) block and RMS q/k norms, two CLIPTextModelWithProjection encoders of different widths
(hidden states concatenated, pooled embeddings concatenated), a T5EncoderModel wider than both (the
CLIP states are padded to its width), tokenizers built here, a 16-channel VAE with shift and scale
and 8x downsampling, and the flow-matching Euler scheduler with SD3's fixed shift of 3.
"""

from __future__ import annotations

# Imports inside functions: diffusers only when the base is built.
from .tiny import (
    TEXT_CONFIG,
    TINY_FLUX_VAE_CONFIG,
    TINY_WORDS,
    build_t5_encoder,
    build_text_encoder_with_projection,
    frozen_from_seed,
)
from .vocabulary import build_t5_tokenizer, build_tokenizer

TINY_SD3_SEED = 20261202
TINY_SD3_TRANSFORMER_CONFIG = dict(
    sample_size=8,  # latents: 64 px / 8
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=128,  # T5's width
    caption_projection_dim=64,  # the transformer's inner width
    pooled_projection_dim=32 + 64,  # both CLIPs' pooled embeddings
    pos_embed_max_size=16,
    dual_attention_layers=(0,),  # SD 3.5's MMDiT-X blocks
    qk_norm="rms_norm",
)
TINY_SD3_VAE_CONFIG = {**TINY_FLUX_VAE_CONFIG, "shift_factor": 0.0609, "scaling_factor": 1.5305}
TINY_SD3_CLIP_2_CONFIG = {**TEXT_CONFIG, "hidden_size": 64, "intermediate_size": 128, "projection_dim": 64}
TINY_SD3_T5_CONFIG = dict(d_model=128, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                          feed_forward_proj="gated-gelu")


def build_tiny_sd3_pipeline():
    """The `tiny-sd3` base: SD 3.5-shaped, random weights, identical on every build."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    tokenizers = [build_tokenizer(list(TINY_WORDS), model_max_length=TEXT_CONFIG["max_position_embeddings"])
                  for _ in range(2)]
    tokenizer_3 = build_t5_tokenizer(list(TINY_WORDS), model_max_length=32)
    models = frozen_from_seed(TINY_SD3_SEED, {
        "transformer": lambda: SD3Transformer2DModel(**TINY_SD3_TRANSFORMER_CONFIG),
        "vae": lambda: AutoencoderKL(**TINY_SD3_VAE_CONFIG),
        "text_encoder": lambda: build_text_encoder_with_projection(tokenizers[0], TEXT_CONFIG),
        "text_encoder_2": lambda: build_text_encoder_with_projection(tokenizers[1], TINY_SD3_CLIP_2_CONFIG),
        "text_encoder_3": lambda: build_t5_encoder(tokenizer_3, TINY_SD3_T5_CONFIG)})
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                                    tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], tokenizer_3=tokenizer_3,
                                    **models)
    pipe.set_progress_bar_config(disable=True)
    return pipe
