"""Small things a user sees: what the repository tracks, what the training CLI prints."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tool_caches_are_not_tracked():
    """schemathesis rewrites .schemathesis/…/manifest.json on every fuzz run."""
    tracked = subprocess.run(["git", "ls-files", ".schemathesis"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.returncode == 0 and tracked.stdout == ""
    ignored = subprocess.run(["git", "check-ignore", "-q", ".schemathesis/examples/manifest.json"], cwd=ROOT)
    assert ignored.returncode == 0


@dataclass
class _State:
    step: int
    losses: list[float] = field(default_factory=list)


def test_the_training_progress_bar_draws_each_step_once(capsys):
    from lorafleet.training.cli import _ProgressBar
    from lorafleet.training.config import load_train_config

    config = load_train_config(None, ["data.path=/nowhere", "max_steps=5"])
    bar = _ProgressBar(config)
    for step in range(1, 6):
        bar(_State(step, [0.5] * step))
    bar.close()
    err = capsys.readouterr().err
    for step in range(1, 6):
        drawn = [line for line in err.replace("\r", "\n").splitlines() if f" {step}/5 " in line]
        assert len(drawn) == 1, f"step {step} drawn {len(drawn)} times:\n{err}"
