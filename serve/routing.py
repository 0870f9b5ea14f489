"""Per-image LoRA routing: one forward pass in which every image uses its own adapters.

peft can route one adapter per row (``adapter_names``), but diffusers does not pass it through,
it cannot give one adapter two weights in one batch, and it cannot compose several adapters on
one row. Here each routed Linear layer gets a forward hook that adds, per row,

    delta[row] = x[row] @ A[row]^T @ B[row]^T

where ``A[row]`` stacks the down-projections of that row's adapters along the rank axis and
``B[row]`` their up-projections scaled by ``weight * alpha / rank``, zero-padded to the batch's
largest total rank (zeros add nothing, so padding is exact). Two batched matrix products per
layer, whatever the number of distinct adapters in the batch; a row with no adapter gets zeros.

Rows follow serve/sampler.py: the text encoder sees one row per image, the UNet ``[unconditional,
conditional]`` (two rows per image) when guidance is on; both orders repeat the image order, so
a layer that sees ``k * n`` rows uses the per-image stacks repeated ``k`` times.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from lorafleet.registry.errors import AdapterIncompatible
from lorafleet.registry.formats import AdapterPayload
from lorafleet.registry.manifest import ComponentLora
from lorafleet.registry.validation import lora_pairs


class NotRoutable(AdapterIncompatible):
    """An adapter the router cannot apply per row (convolution LoRA, DoRA); served unbatched."""


@dataclass(frozen=True)
class RoutedLayer:
    down: torch.Tensor  # A: [rank, in_features]
    up: torch.Tensor  # B * alpha / rank: [out_features, rank]


@dataclass(frozen=True)
class RoutedAdapter:
    """An adapter's per-layer updates, keyed ``<component>.<module path>``, on the model's device."""

    digest: str
    layers: dict[str, RoutedLayer]

    @property
    def nbytes(self) -> int:
        return sum((layer.down.numel() + layer.up.numel()) * layer.down.element_size()
                   for layer in self.layers.values())


def _pattern_value(pattern: dict, module: str, default):
    """A rank/alpha pattern's value for ``module``, matched as peft matches it when loading."""
    from peft.utils.other import get_pattern_key

    return pattern.get(get_pattern_key(pattern.keys(), module), default)


def _scale(config: ComponentLora, module: str) -> float:
    rank = _pattern_value(config.rank_pattern, module, config.rank)
    alpha = _pattern_value(config.alpha_pattern, module, config.alpha)
    return float(alpha) / float(rank)


def prepare_routed(digest: str, payload: AdapterPayload, device: torch.device, dtype: torch.dtype) -> RoutedAdapter:
    """The adapter's layers in routing form; raises NotRoutable for what the router cannot apply."""
    if any(config.use_dora for config in payload.components.values()):
        raise NotRoutable("DoRA adapters are not routed per row", field="adapters")
    pairs = lora_pairs(payload)
    if sum(len(parts) for parts in pairs.values()) != len(payload.tensors):
        raise NotRoutable("the adapter has tensors that are not LoRA up/down weights", field="adapters")
    if any(tensor.ndim != 2 for parts in pairs.values() for tensor in parts.values()):
        raise NotRoutable("convolution LoRA layers are not routed per row", field="adapters")
    layers = {}
    for (component, module), parts in pairs.items():
        scale = _scale(payload.components[component], module)
        layers[f"{component}.{module}"] = RoutedLayer(
            down=parts["A"].to(device=device, dtype=dtype).contiguous(),
            up=(parts["B"].to(device=device, dtype=torch.float32) * scale).to(dtype).contiguous(),
        )
    return RoutedAdapter(digest, layers)


ImageAdapters = tuple[tuple[RoutedAdapter, float], ...]  # one image's adapters with weights


def stack_layer(layer: str, images: list[ImageAdapters]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ``A [n, R, in]`` and ``B [n, out, R]`` for one layer, zero-padded to R."""
    parts = [[(a.layers[layer], w) for a, w in image if layer in a.layers] for image in images]
    sample = next(p[0][0] for p in parts if p)
    total = max(sum(routed.down.shape[0] for routed, _ in part) for part in parts)
    down = sample.down.new_zeros(len(images), total, sample.down.shape[1])
    up = sample.up.new_zeros(len(images), sample.up.shape[0], total)
    for row, part in enumerate(parts):
        offset = 0
        for routed, weight in part:
            rank = routed.down.shape[0]
            down[row, offset:offset + rank] = routed.down
            up[row, :, offset:offset + rank] = routed.up * weight
            offset += rank
    return down, up


class LoraRouter:
    """Adds per-row LoRA updates to a pipeline's Linear layers for the length of one batch."""

    def __init__(self, pipe):
        self.pipe = pipe

    def _module(self, layer: str) -> torch.nn.Module:
        component, path = layer.split(".", 1)
        try:
            module = getattr(self.pipe, component).get_submodule(path)
        except AttributeError as exc:
            raise AdapterIncompatible(f"the base has no layer {layer}", field="adapters") from exc
        linear = getattr(module, "base_layer", module)  # a peft-wrapped layer keeps its Linear here
        if not isinstance(linear, torch.nn.Linear):
            raise NotRoutable(f"{layer} is not a Linear layer", field="adapters")
        return module

    @contextmanager
    def route(self, images: list[ImageAdapters]):
        """Within the block, row r of every routed layer uses image ``r % n``'s adapters."""
        layers = sorted({layer for image in images for adapter, _ in image for layer in adapter.layers})
        handles = []
        try:
            for layer in layers:
                down, up = stack_layer(layer, images)
                handles.append(self._module(layer).register_forward_hook(_RowUpdate(down, up)))
            yield len(layers)
        finally:
            for handle in handles:
                handle.remove()


class _RowUpdate:
    """The forward hook of one layer: ``output += x @ A[row]^T @ B[row]^T`` per row."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        self.images = down.shape[0]
        self.by_rows = {self.images: (down.transpose(1, 2), up.transpose(1, 2))}

    def _weights(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        if rows not in self.by_rows:
            if rows % self.images:
                raise RuntimeError(f"a routed layer saw {rows} rows for a batch of {self.images} images")
            down, up = self.by_rows[self.images]
            repeat = rows // self.images
            self.by_rows[rows] = (down.repeat(repeat, 1, 1), up.repeat(repeat, 1, 1))
        return self.by_rows[rows]

    def __call__(self, module, args, output):
        x = args[0]
        rows = x.shape[0]
        down, up = self._weights(rows)
        reduced = torch.bmm(x.reshape(rows, -1, x.shape[-1]), down)
        if output.is_contiguous():  # added in place: one kernel, no temporary the size of the output
            by_row = output.view(rows, -1, output.shape[-1])
            torch.baddbmm(by_row, reduced, up, out=by_row)
            return output
        return output + torch.bmm(reduced, up).reshape(output.shape)
