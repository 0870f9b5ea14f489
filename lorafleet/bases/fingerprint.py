"""A base model's fingerprint: sha256 over its components' configs and weights.

Computed from the loaded pipeline, so the built-in ``tiny`` and its exported diffusers
directory have the same fingerprint. Keys that only record where or with which library
version a config was saved are left out.
"""

from __future__ import annotations

import hashlib
import json

import torch

from lorafleet.families import family_of_pipeline

_VOLATILE_KEYS = {
    "_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash", "architectures",
    "dtype", "torch_dtype", "_use_default_values", "_attn_implementation_autoset",
    "_attn_implementation", "output_attentions", "output_hidden_states", "use_cache",
}


def _config_dict(component) -> dict:
    config = component.config
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in sorted(raw.items()) if k not in _VOLATILE_KEYS and not k.startswith("_")}


def _hash_module(hasher, module: torch.nn.Module) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        hasher.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def _hash_tokenizer(hasher, tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    hasher.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode())
    hasher.update(f"max_length={tokenizer.model_max_length}".encode())


def pipeline_fingerprint(pipe) -> str:
    """Over the family's models (denoiser, VAE, text encoders), tokenizers and scheduler config."""
    family = family_of_pipeline(pipe)
    hasher = hashlib.sha256()
    for name, component in family.models(pipe).items():
        hasher.update(f"[{name}:{type(component).__name__}]".encode())
        hasher.update(json.dumps(_config_dict(component), sort_keys=True, default=str).encode())
        _hash_module(hasher, component)
    for name in family.tokenizers:
        _hash_tokenizer(hasher, getattr(pipe, name))
    scheduler = {k: v for k, v in sorted(dict(pipe.scheduler.config).items()) if not k.startswith("_")}
    hasher.update(json.dumps(scheduler, sort_keys=True, default=str).encode())
    return "sha256:" + hasher.hexdigest()
