"""Per-image LoRA routing: one forward pass in which every image uses its own adapters.

peft can route one adapter per row (``adapter_names``), but diffusers does not pass it through,
it cannot give one adapter two weights in one batch, and it cannot compose several adapters on
one row. Here every routed Linear layer computes, per row,

    y[row] = x[row] @ W^T + b + x[row] @ A[row]^T @ B[row]^T

where ``A[row]`` stacks the down-projections of that row's adapters along the rank axis and
``B[row]`` their up-projections scaled by ``weight * alpha / rank``, zero-padded to the batch's
largest total rank (zeros add nothing, so padding is exact); a row with no adapter gets zeros.
For the length of a batch each routed layer's forward is replaced; a call runs in one of three
forms, chosen by the pass's adapters and the call's shape:

- update: the base product plus two batched products, whatever the number of distinct
  adapters. Costs ``R * (in + out)`` per token.
- merged: when every image of the pass has the same weighted set, ``W + B A`` merged once per
  pass, then the plain product: each step costs what the base product costs. ``in * out`` of
  memory, from the same budget as row weights.
- row weights: ``W + B[row] A[row]`` merged once per pass, then one batched product with
  per-row weights in place of the base one: no extra work per step, but ``rows * in * out`` of
  memory. Chosen while the pass's ``row_weights_bytes`` lasts, for a layer whose per-row weights
  fit in a core's cache (1 MiB) or are no larger than the rows' activations
  (``in * out <= tokens * (in + out)``).

Building row weights costs a few operations per layer per pass, which a pass of few steps
notices. Where every image has one adapter, an adapter's layers of one component and one shape
(``LayerGroup``, stacked when the adapter is prepared) get theirs at once: a few operations per
group (``GroupRows``). The stacks of ``A`` and ``B`` a layer builds alone are made at its first
call, already repeated to its rows. Measured in process on `tiny` (`lorafleet bench serve --steps
4 --sections throughput --repeats 20`, 8 images on different adapters): 13.1 % over a base pass
per layer, 9.6 % per group; at 20 steps no difference shows (docs/benchmarks.md).

Measured per layer on this 2-core CPU (one 8-image guided pass, 20 steps, 16 rows): the update
adds 40-85% to a small layer's own product, mostly per-call overhead, while per-row weights cost
-17% to +19% of the plain product where the rule picks them, and 2.2x where it does not (16
tokens, 256 x 256: 4 MiB of weights per call). On a GPU the per-row weights would be read from
memory at every call, so there the budget defaults to 0
(``lorafleet.accelerator.row_weights_budget``).

Rows follow serve/sampler.py: the text encoder sees one row per image, the UNet ``[unconditional,
conditional]`` (two rows per image) when guidance is on; both orders repeat the image order, so
a layer that sees ``k * n`` rows uses the per-image stacks (or row weights) repeated ``k`` times.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lorafleet.registry.errors import AdapterIncompatible
from lorafleet.registry.payload import AdapterPayload
from lorafleet.registry.validation import lora_pairs


class NotRoutable(AdapterIncompatible):
    """An adapter the router cannot apply per row (convolution LoRA, DoRA); served unbatched."""


@dataclass(frozen=True)
class RoutedLayer:
    down: torch.Tensor  # A: [rank, in_features]
    up: torch.Tensor  # B * alpha / rank: [out_features, rank]


@dataclass(frozen=True)
class LayerGroup:
    """An adapter's layers of one component and one shape, stacked: its layers' ``RoutedLayer``
    tensors are views into these, so a pass can build every layer's row weights at once."""

    layers: tuple[str, ...]
    down: torch.Tensor  # [layers, rank, in_features]
    up: torch.Tensor  # [layers, out_features, rank]


GroupKey = tuple[str, int, int, int]  # component, in_features, out_features, rank


@dataclass(frozen=True)
class RoutedAdapter:
    """An adapter's per-layer updates, keyed ``<component>.<module path>``, on the model's device."""

    digest: str
    layers: dict[str, RoutedLayer]
    groups: dict[GroupKey, LayerGroup] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum((layer.down.numel() + layer.up.numel()) * layer.down.element_size()
                   for layer in self.layers.values())


def prepare_routed(digest: str, payload: AdapterPayload, device: torch.device, dtype: torch.dtype) -> RoutedAdapter:
    """The adapter's layers in routing form; raises NotRoutable for what the router cannot apply."""
    if any(config.use_dora for config in payload.components.values()):
        raise NotRoutable("DoRA adapters are not routed per row", field="adapters")
    pairs = lora_pairs(payload)
    if sum(len(parts) for parts in pairs.values()) != len(payload.tensors):
        raise NotRoutable("the adapter has tensors that are not LoRA up/down weights", field="adapters")
    if any(tensor.ndim != 2 for parts in pairs.values() for tensor in parts.values()):
        raise NotRoutable("convolution LoRA layers are not routed per row", field="adapters")
    grouped: dict[GroupKey, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # per group, per layer: A, B
    for (component, module), parts in sorted(pairs.items()):
        scale = payload.components[component].scale_of(module)
        down = parts["A"].to(device=device, dtype=dtype)
        up = (parts["B"].to(device=device, dtype=torch.float32) * scale).to(dtype)
        key = (component, down.shape[1], up.shape[0], down.shape[0])
        grouped.setdefault(key, {})[f"{component}.{module}"] = down, up
    layers, groups = {}, {}
    for key, members in grouped.items():
        downs, ups = zip(*members.values())
        group = groups[key] = LayerGroup(tuple(members), torch.stack(downs), torch.stack(ups))
        layers.update({name: RoutedLayer(group.down[i], group.up[i]) for i, name in enumerate(group.layers)})
    return RoutedAdapter(digest, layers, groups)


ImageAdapters = tuple[tuple[RoutedAdapter, float], ...]  # one image's adapters with weights


def stack_layer(layer: str, images: list[ImageAdapters]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ``A [n, R, in]`` and ``B [n, out, R]`` for one layer, zero-padded to R."""
    parts = [[(a.layers[layer], w) for a, w in image if layer in a.layers] for image in images]
    if all(len(part) == 1 for part in parts) and len({part[0][0].down.shape for part in parts}) == 1:
        return _stack_one_per_image([part[0] for part in parts])
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


def _stack_one_per_image(parts: list[tuple[RoutedLayer, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The common case, in two copies: one adapter per image, all of one rank."""
    down = torch.stack([routed.down for routed, _ in parts])
    up = torch.stack([routed.up for routed, _ in parts])
    weights = [weight for _, weight in parts]
    if any(weight != 1.0 for weight in weights):
        up *= torch.tensor(weights, dtype=up.dtype, device=up.device).view(-1, 1, 1)
    return down, up


class LoraRouter:
    """Routes per-row LoRA through a pipeline's Linear layers for the length of one batch."""

    def __init__(self, pipe, row_weights_bytes: int = 0):
        self.pipe = pipe
        self.row_weights_bytes = row_weights_bytes
        self.last_forms: dict[str, str | None] = {}  # per routed layer, how its last call ran
        self.last_grouped: set[str] = set()  # the routed layers whose row weights their group built
        self.by_group = True  # build row weights per layer group (False: per layer; the bench compares them)
        self._linears: dict[str, torch.nn.Linear] = {}
        self._routing: list[dict[str, _RoutedLinear]] = []  # the routes entered, innermost last

    def _module(self, layer: str) -> torch.nn.Linear:
        """The Linear layer named ``layer`` (peft's injection and removal keep the same object)."""
        if layer not in self._linears:
            self._linears[layer] = self._find(layer)
        return self._linears[layer]

    def _find(self, layer: str) -> torch.nn.Linear:
        component, path = layer.split(".", 1)
        try:
            module = getattr(self.pipe, component).get_submodule(path)
        except AttributeError as exc:
            raise AdapterIncompatible(f"the base has no layer {layer}", field="adapters") from exc
        linear = getattr(module, "base_layer", module)  # a peft-wrapped layer keeps its Linear here
        if not isinstance(linear, torch.nn.Linear):
            raise NotRoutable(f"{layer} is not a Linear layer", field="adapters")
        return linear

    @contextmanager
    def route(self, images: list[ImageAdapters]):
        """Within the block, row r of every routed layer uses image ``r % n``'s adapters."""
        layer_names = sorted({layer for image in images for adapter, _ in image for layer in adapter.layers})
        budget = _Budget(self.row_weights_bytes)
        uniform = _one_set(images)
        routed: dict[str, _RoutedLinear] = {}
        self._routing.append(routed)
        try:
            groups = self._shared_groups(images) if self.by_group and not uniform else {}
            for name in layer_names:
                linear = self._module(name)
                routed[name] = linear.forward = _RoutedLinear(linear, name, images[:1] if uniform else images,
                                                              budget, uniform, groups.get(name))
            yield
        finally:
            for name in routed:
                del self._module(name).forward
            self._routing.pop()
            self.last_forms = {name: layer.form for name, layer in routed.items()}
            self.last_grouped = {name for name, layer in routed.items() if layer.grouped}

    def _shared_groups(self, images: list[ImageAdapters]) -> dict[str, tuple[GroupRows, int]]:
        """Per layer, its group's row weights and its index in them, for each group that every
        image has from its one adapter with the same layers (else the layer builds its own)."""
        if not all(len(image) == 1 for image in images):
            return {}
        found = {}
        for key, group in images[0][0][0].groups.items():
            members = [adapter.groups.get(key) for ((adapter, _),) in images]
            if all(member is not None and member.layers == group.layers for member in members):
                rows = GroupRows([self._module(name) for name in group.layers], members,
                                 [weight for ((_, weight),) in images])
                found.update({name: (rows, index) for index, name in enumerate(group.layers)})
        return found

    @contextmanager
    def suspended(self):
        """Within the block, no layer is routed; the routing under way (if any) resumes after it,
        so another pass can run between two steps of a routed one."""
        current = self._routing[-1] if self._routing else {}
        for name in current:
            del self._module(name).forward
        try:
            yield
        finally:
            for name, layer in current.items():
                self._module(name).forward = layer


def _one_set(images: list[ImageAdapters]) -> bool:
    """Whether every image has the same adapters with the same weights."""
    first = images[0]
    return all(len(image) == len(first) and all(adapter is other and weight == other_weight
                                                for (adapter, weight), (other, other_weight) in zip(image, first))
               for image in images[1:])


class _Budget:
    def __init__(self, bytes_left: int):
        self.bytes_left = bytes_left

    def take(self, nbytes: int) -> bool:
        if nbytes > self.bytes_left:
            return False
        self.bytes_left -= nbytes
        return True


ROW_WEIGHTS_CACHE_BYTES = 1024**2  # per-row weights this small stay in a CPU core's cache


def _weight_bytes(linear: torch.nn.Linear, copies: int = 1) -> int:
    """Memory of ``copies`` weights of ``linear``'s shape (merged or per-row weights)."""
    return copies * linear.weight.numel() * linear.weight.element_size()


class GroupRows:
    """Per-row weights ``W^T + A^T B^T`` of every layer of one group (``LayerGroup``: one component,
    one shape), built at once: a few batched operations per pass instead of a few per layer."""

    def __init__(self, linears: list[torch.nn.Linear], members: list[LayerGroup], weights: list[float]):
        self.linears = linears
        self.downs = [member.down for member in members]  # per image
        self.ups = [member.up if weight == 1.0 else member.up * weight for member, weight in zip(members, weights)]
        self.by_rows: dict[int, torch.Tensor | None] = {}

    def weights(self, rows: int, budget: _Budget) -> torch.Tensor | None:
        """``[layers, rows, in, out]``, once per row count (None: over the budget)."""
        if rows not in self.by_rows:
            nbytes = len(self.linears) * _weight_bytes(self.linears[0], rows)
            self.by_rows[rows] = self._build(rows) if budget.take(nbytes) else None
        return self.by_rows[rows]

    def _build(self, rows: int) -> torch.Tensor:
        repeats = rows // len(self.downs)
        down = torch.stack(self.downs * repeats, dim=1)  # [layers, rows, R, in]
        up = torch.stack(self.ups * repeats, dim=1)  # [layers, rows, out, R]
        base = torch.stack([linear.weight.t() for linear in self.linears]).unsqueeze(1)  # [layers, 1, in, out]
        return torch.matmul(down.transpose(-1, -2), up.transpose(-1, -2)).add_(base)


class _RoutedLinear:
    """One Linear layer's forward for the length of a batch, in either form (module docstring)."""

    def __init__(self, linear: torch.nn.Linear, name: str, images: list[ImageAdapters], budget: _Budget,
                 uniform: bool = False, group: tuple[GroupRows, int] | None = None):
        """``uniform``: every image has the same set (``images`` may then hold one image). The
        stacks are built at a call's first shape, already repeated to its rows: one copy each.
        ``group``: the layer's group's row weights and its index in them (``_shared_groups``)."""
        self.linear, self.name, self.budget, self.group = linear, name, budget, group
        self.grouped = False  # whether its row weights came from its group
        self.uniform = uniform
        self.image_adapters = images
        self.images = len(images)
        self.calls: dict[tuple[int, int], Callable] = {}  # by (rows, tokens)
        self.weights_by_rows: dict[int, torch.Tensor] = {}
        self.merged: torch.Tensor | None = None
        self.form: str | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        by_row = x.reshape(x.shape[0], -1, x.shape[-1])
        call = self.calls.get(by_row.shape[:2]) or self._prepare(*by_row.shape[:2])
        return call(x, by_row)

    def _check_rows(self, rows: int) -> None:
        if rows % self.images:
            raise RuntimeError(f"a routed layer saw {rows} rows for a batch of {self.images} images")

    def _stacks(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row ``A^T [rows, in, R]`` and ``B^T [rows, R, out]`` (rows repeat the image order)."""
        self._check_rows(rows)
        down, up = stack_layer(self.name, self.image_adapters * (rows // self.images))
        return down.transpose(1, 2), up.transpose(1, 2)

    def _row_weights_pay(self, rows: int, tokens: int) -> bool:
        """Measured on CPU (module docstring): per-row weights cost about what the plain product
        does while they stay in cache or are no larger than the rows' activations in and out."""
        out_features, in_features = self.linear.weight.shape
        return (_weight_bytes(self.linear, rows) <= ROW_WEIGHTS_CACHE_BYTES
                or in_features * out_features <= tokens * (in_features + out_features))

    def _prepare(self, rows: int, tokens: int) -> Callable:
        call = self._merged_call() if self.uniform else None
        if call is None:
            weights = self._row_weights(rows, tokens)
            call = self._with_update(rows) if weights is None else self._with_row_weights(weights)
        self.calls[rows, tokens] = call
        return call

    def _merged_call(self) -> Callable | None:
        """The one set merged into the weight, once per pass (None: over the budget)."""
        weight = self.linear.weight
        if self.merged is None and self.budget.take(_weight_bytes(self.linear)):
            down, up = self._stacks(self.images)
            self.merged = torch.addmm(weight, up[0].T, down[0].T)  # W + B A: [out, in]
        return None if self.merged is None else self._with_merged(self.merged)

    def _row_weights(self, rows: int, tokens: int) -> torch.Tensor | None:
        """Per-row merged weights, once per row count whatever the tokens (None: they do not pay)."""
        weights = self.weights_by_rows.get(rows)
        if weights is None and self._row_weights_pay(rows, tokens):
            weights = self._group_row_weights(rows)
            if weights is None and self.budget.take(_weight_bytes(self.linear, rows)):
                weight = self.linear.weight.t().unsqueeze(0).expand(rows, -1, -1)
                weights = torch.baddbmm(weight, *self._stacks(rows))  # [rows, in, out]: W^T + A^T B^T per row
            if weights is not None:
                self.weights_by_rows[rows] = weights
        return weights

    def _group_row_weights(self, rows: int) -> torch.Tensor | None:
        """This layer's part of its group's row weights, where they pay whatever the tokens (so
        they pay for every layer of the group: all have this shape)."""
        if self.group is None or _weight_bytes(self.linear, rows) > ROW_WEIGHTS_CACHE_BYTES:
            return None
        self._check_rows(rows)
        group, index = self.group
        weights = group.weights(rows, self.budget)
        self.grouped = weights is not None
        return None if weights is None else weights[index]

    def _with_merged(self, merged: torch.Tensor) -> Callable:
        bias = self.linear.bias

        def with_merged(x, by_row):
            self.form = "merged"
            return torch.nn.functional.linear(x, merged, bias)

        return with_merged

    def _with_row_weights(self, weights: torch.Tensor) -> Callable:
        bias = self.linear.bias

        def with_row_weights(x, by_row):
            self.form = "weights"
            out = torch.bmm(by_row, weights) if bias is None else torch.baddbmm(bias, by_row, weights)
            return out.view(*x.shape[:-1], out.shape[-1])

        return with_row_weights

    def _with_update(self, rows: int) -> Callable:
        down, up = self._stacks(rows)

        def with_update(x, by_row):
            self.form = "update"
            out = torch.nn.functional.linear(x, self.linear.weight, self.linear.bias)
            out_by_row = out.view(rows, -1, out.shape[-1])  # a fresh contiguous output: added in place
            torch.baddbmm(out_by_row, torch.bmm(by_row, down), up, out=out_by_row)
            return out

        return with_update
