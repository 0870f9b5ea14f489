"""An adapter in the one stored layout: what every accepted layout converts to (formats.py).

The stored bytes are what diffusers' ``save_lora_weights`` writes: keys
``<component>.<module>.lora_A.weight`` / ``lora_B.weight`` and each component's peft LoRA config in
the ``lora_adapter_metadata`` header entry, so ``pipe.load_lora_weights(file)`` keeps rank and
alpha; lorafleet's own entry records the format and trigger tokens.
"""

from __future__ import annotations

# Imports inside functions: safetensors' torch API only when tensors are written.
import json
from dataclasses import dataclass, field

import torch

from .errors import InvalidAdapter
from .manifest import AdapterFormat, ComponentLora
from .safetensors_io import UntrustedJsonError, canonical_safetensors, parse_untrusted_json

LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry
LORAFLEET_METADATA_KEY = "lorafleet"


@dataclass
class AdapterPayload:
    """An adapter in the stored layout, ready to validate and serialize."""

    format: AdapterFormat
    tensors: dict[str, torch.Tensor]
    components: dict[str, ComponentLora] = field(default_factory=dict)
    trigger_tokens: list[str] = field(default_factory=list)
    source_format: str = "diffusers"
    source_metadata: dict[str, str] = field(default_factory=dict)  # header of the file read

    def lora_metadata(self) -> dict:
        flat = {}
        for component, config in sorted(self.components.items()):
            for key, value in config.peft_config_dict().items():
                flat[f"{component}.{key}"] = value
        return flat

    def to_bytes(self, extra_metadata: dict | None = None) -> bytes:
        from safetensors.torch import save

        metadata = {"format": "pt"}
        if self.components:
            metadata[LORA_METADATA_KEY] = json.dumps(self.lora_metadata(), indent=2, sort_keys=True)
        info = {"format": self.format.value, "trigger_tokens": self.trigger_tokens, **(extra_metadata or {})}
        metadata[LORAFLEET_METADATA_KEY] = json.dumps(info, sort_keys=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(self.tensors.items())}
        return canonical_safetensors(save(tensors, metadata=metadata))

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def json_metadata(metadata: dict[str, str], key: str) -> dict:
    """A JSON object stored under ``key`` in safetensors metadata ({} when absent)."""
    raw = metadata.get(key)
    if not raw:
        return {}
    try:
        value = parse_untrusted_json(raw)
    except UntrustedJsonError as exc:
        raise InvalidAdapter(f"safetensors metadata {key!r} is not valid JSON ({exc})", field="path") from exc
    if not isinstance(value, dict):
        raise InvalidAdapter(f"safetensors metadata {key!r} must be a JSON object", field="path")
    return value
