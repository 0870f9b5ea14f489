"""The original (LDM / SGM) names of a diffusers UNet's modules and parameters.

Stability's UNet code names blocks ``input_blocks``, ``middle_block`` and ``output_blocks``; SD 1.x
single-file checkpoints and SDXL's (and kohya's SDXL LoRAs) use those names. One mapping serves the
single-file writer (lorafleet/bases/single_file.py) and SDXL's kohya names (sdxl.py).
"""

from __future__ import annotations

_RESNET_LAYERS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                  "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
              "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def ldm_unet_path(path: str, layers_per_block: int, up_blocks_with_attention: tuple[bool, ...]) -> str:
    """The LDM/SGM name of a diffusers UNet module or parameter path (``down_blocks.1.attentions.0...``
    -> ``input_blocks.4.1...``), for a UNet with ``layers_per_block`` and these up levels' attention."""
    for diffusers_name, sgm_name in _TOP_LEVEL.items():
        if path == diffusers_name or path.startswith(diffusers_name + "."):
            return sgm_name + path[len(diffusers_name):]
    parts = path.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        head = _level_block(parts[0], level, kind, index, layers_per_block, up_blocks_with_attention)
    elif parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        head = f"middle_block.{1 if kind == 'attentions' else 2 * index}"
    else:
        return path
    if kind == "resnets" and rest and rest[0] in _RESNET_LAYERS:
        rest = [_RESNET_LAYERS[rest[0]], *rest[1:]]
    if kind == "downsamplers" and rest[:1] == ["conv"]:
        rest = ["op", *rest[1:]]
    return ".".join([head, *rest])


def _level_block(block: str, level: int, kind: str, index: int, per_block: int,
                 up_attention: tuple[bool, ...]) -> str:
    if block == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * (per_block + 1)}.0"
        return f"input_blocks.{1 + level * (per_block + 1) + index}.{1 if kind == 'attentions' else 0}"
    if kind == "upsamplers":  # after the resnet, and the attention where the level has one
        return f"output_blocks.{level * (per_block + 1) + per_block}.{2 if up_attention[level] else 1}"
    return f"output_blocks.{level * (per_block + 1) + index}.{1 if kind == 'attentions' else 0}"




def ldm_unet_namer(config):
    """``ldm_unet_path`` for one UNet config."""
    with_attention = tuple("CrossAttn" in kind for kind in config.up_block_types)
    return lambda path: ldm_unet_path(path, config.layers_per_block, with_attention)
