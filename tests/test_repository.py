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


def _locked() -> dict[str, str]:
    import re

    text = (ROOT / "requirements.lock").read_text()
    return {name.lower().replace("_", "-"): version
            for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==([^ \\\n]+)", text, re.M)}


def test_the_lock_pins_every_dependency_with_hashes():
    """A range is not a build: setup, CI and the image install exact versions, hash-checked."""
    import re

    text = (ROOT / "requirements.lock").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", text.split("\n", 7)[-1])
    pinned = [e for e in entries if re.match(r"[A-Za-z0-9_.-]+==", e)]
    assert len(pinned) > 100 and all("--hash=sha256:" in e for e in pinned)
    locked = _locked()
    assert locked["transformers"] == "5.23.0"  # 5.24 needs a peft the index does not have (2026-11-30)
    assert locked["torch"] == "2.13.0+cpu"
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "--require-hashes --no-deps" in setup and "requirements.lock" in (ROOT / "Dockerfile").read_text()


def test_the_installed_environment_is_the_lock():
    """What `make setup` installed is exactly the locked build (no package drifted to a newer release)."""
    import importlib.metadata as metadata

    drifted = []
    for name, version in _locked().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            drifted.append(f"{name}: missing")
            continue
        if installed != version:
            drifted.append(f"{name}: {installed} installed, {version} locked")
    assert not drifted, drifted
