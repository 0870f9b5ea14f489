"""What a training run tells the world while it runs: observers the loop calls at named points.

The loop never knows who listens (a progress bar, TensorBoard, MLflow, a training service's event
stream); each observer implements the points it cares about. An observer that fails during the
run stops it (it is told the run's state); one that fails after the last step is logged only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as observers see it."""

    step: int  # steps done (1-based)
    max_steps: int
    loss: float
    learning_rate: float
    grad_norm: float  # before clipping
    seconds: float  # training time so far

    @property
    def eta_s(self) -> float:
        return self.seconds / self.step * (self.max_steps - self.step) if self.step else 0.0


class RunObserver:
    """Every point is optional: the base class ignores it."""

    def on_start(self, config, max_steps: int, first_step: int) -> None:
        """Before the first step (``first_step`` > 0 on resume)."""

    def on_step(self, record: StepRecord, state) -> None:
        """After each optimizer step (may raise loop.Interrupted to stop the run)."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """A checkpoint was written."""

    def on_validation(self, step: int, grid: Path, images: list[np.ndarray]) -> None:
        """Validation images were sampled (``grid`` is their PNG)."""

    def on_finish(self, result) -> None:
        """The adapter is exported (training.loop.TrainResult)."""

    def lineage(self) -> dict[str, str]:
        """What this observer adds to the published adapter's lineage (e.g. a tracking run id)."""
        return {}

    def close(self) -> None:
        """The run ended (finished or failed)."""


class StepCallback(RunObserver):
    """A plain ``callback(state)`` after each step (tests, and callers that only count steps)."""

    def __init__(self, callback: Callable):
        self.callback = callback

    def on_step(self, record: StepRecord, state) -> None:
        self.callback(state)


class Observers(RunObserver):
    """Several observers as one, called in order."""

    def __init__(self, observers: Iterable[RunObserver | None]):
        self.observers = [o for o in observers if o is not None]

    def on_start(self, config, max_steps: int, first_step: int) -> None:
        for observer in self.observers:
            observer.on_start(config, max_steps, first_step)

    def on_step(self, record: StepRecord, state) -> None:
        for observer in self.observers:
            observer.on_step(record, state)

    def on_checkpoint(self, step: int, path: Path) -> None:
        for observer in self.observers:
            observer.on_checkpoint(step, path)

    def on_validation(self, step: int, grid: Path, images: list[np.ndarray]) -> None:
        for observer in self.observers:
            observer.on_validation(step, grid, images)

    def on_finish(self, result) -> None:
        for observer in self.observers:
            observer.on_finish(result)

    def lineage(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for observer in self.observers:
            merged.update(observer.lineage())
        return merged

    def close(self) -> None:
        for observer in self.observers:
            observer.close()
