"""Training's errors: configs, data, checkpoints, runs on Ray."""

from __future__ import annotations

from lorafleet.errors import ErrorKind, LorafleetError


class TrainingInputInvalid(LorafleetError):
    """A training config value, the data folder or a checkpoint cannot be used; ``field`` names it."""

    code = "invalid_training_input"
    kind = ErrorKind.invalid


class TrainingJobFailed(LorafleetError):
    """A training run on Ray (a Ray job or a Ray Train run) failed or did not finish."""

    code = "training_failed"
    kind = ErrorKind.internal


class TrainingClusterUnavailable(LorafleetError):
    """The Ray cluster (its job server) did not answer."""

    code = "training_cluster_unavailable"
    kind = ErrorKind.unavailable
