"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint holds the trainable tensors, the optimizer state, the LR scheduler state, the
EMA weights, the step and the loss history. It is written to a temporary folder and renamed,
so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import TrainingInputInvalid

CHECKPOINTS = "checkpoints"


@dataclass
class TrainingState:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _flatten(tree: dict, prefix: str, tensors: dict, scalars: dict) -> None:
    for name, value in tree.items():
        key = f"{prefix}/{name}"
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().to("cpu").contiguous()
        elif isinstance(value, dict):
            _flatten(value, key, tensors, scalars)
        else:
            scalars[key] = value


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict (nested, e.g. bitsandbytes' quant state) -> (tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        _flatten(per_param, str(index), tensors, scalars)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(rest["scalars"].items()):
        index, *path = key.split("/")
        node = state.setdefault(int(index), {})
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:09d}"


def save_checkpoint(output_dir: Path, state: TrainingState, trainable: dict[str, torch.Tensor], optimizer,
                    lr_scheduler, ema, config_json: dict) -> Path:
    final = checkpoint_dir(output_dir, state.step)
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    optimizer_tensors, optimizer_rest = _split_optimizer(optimizer.state_dict())
    save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
    if ema is not None:
        save_file({str(i): p.detach().to("cpu").contiguous() for i, p in enumerate(ema.shadow_params)},
                  str(tmp / "ema.safetensors"))
    meta = {"step": state.step, "losses": state.losses, "seconds": state.seconds, "optimizer": optimizer_rest,
            "lr_scheduler": lr_scheduler.state_dict(), "config": config_json}
    (tmp / "state.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def latest_checkpoint(output_dir: Path) -> Path | None:
    root = Path(output_dir) / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".partial")) \
        if root.is_dir() else []
    return done[-1] if done else None


def _comparable(config_json: dict) -> dict:
    ignored = {"max_steps", "checkpoint_every", "validation_every", "publish", "output_dir"}
    return {k: v for k, v in config_json.items() if k not in ignored}


def load_checkpoint(path: Path, optimizer, lr_scheduler, ema, config_json: dict):
    """(state, trainable tensors); refuses a checkpoint made with another config."""
    meta = json.loads((path / "state.json").read_text())
    if _comparable(meta["config"]) != _comparable(config_json):
        raise TrainingInputInvalid(f"checkpoint {path} was made with a different training config; use a fresh "
                                   "output_dir or the same config", field="resume")
    optimizer.load_state_dict(_join_optimizer(load_file(str(path / "optimizer.safetensors")), meta["optimizer"]))
    lr_scheduler.load_state_dict(meta["lr_scheduler"])
    if ema is not None and (path / "ema.safetensors").is_file():
        saved = load_file(str(path / "ema.safetensors"))
        for index, parameter in enumerate(ema.shadow_params):
            parameter.data.copy_(saved[str(index)])
    state = TrainingState(step=meta["step"], losses=list(meta["losses"]), seconds=float(meta.get("seconds", 0)))
    return state, load_file(str(path / "trainable.safetensors"))
