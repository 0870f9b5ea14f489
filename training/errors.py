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


class DatasetInvalid(LorafleetError):
    """An uploaded or named dataset cannot be used (not an archive, unsafe, or no usable image)."""

    code = "invalid_dataset"
    kind = ErrorKind.invalid


class DatasetTooLarge(LorafleetError):
    """A dataset upload (or what it unpacks to) is over its limit."""

    code = "dataset_too_large"
    kind = ErrorKind.too_large


class DatasetNotFound(LorafleetError):
    code = "dataset_not_found"
    kind = ErrorKind.not_found


class TrainingNotFound(LorafleetError):
    code = "training_not_found"
    kind = ErrorKind.not_found


class TrainingStateConflict(LorafleetError):
    """The training's state forbids the request (e.g. cancelling a finished one)."""

    code = "training_state_conflict"
    kind = ErrorKind.conflict


class TrainingsUnavailable(LorafleetError):
    """Trainings are not configured on this server, or their Ray cluster does not answer."""

    code = "trainings_unavailable"
    kind = ErrorKind.unavailable


class OutboundTargetRefused(LorafleetError):
    """A URL the server would call (a webhook, an MLflow server) points where it may not go:
    a private, loopback or link-local address that the operator has not allowed."""

    code = "outbound_target_refused"
    kind = ErrorKind.invalid
