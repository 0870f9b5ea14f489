"""Gated promotion: `lorafleet registry promote NAME@V --alias prod --gate GATE.yaml`.

The candidate is evaluated against what the alias serves now (same prompts, seeds and control
prompts); the move happens only when every threshold of the gate holds, and the eval report is
stored content-addressed in the registry with its digest in the alias's history. Feedback, when
the gate names a database, must not be worse beyond its threshold either.

    prompts: [a sks circle, a sks square]      # or prompts_file: FILE (one per line)
    control: [a red circle, a blue square]     # default: the toy base's own prompts on toy
    seeds: 8
    max_accuracy_drop: 0.05                    # candidate >= current - 0.05
    max_drift: 10.0                            # candidate's mean drift on control prompts
    max_drift_increase: 2.0                    # ... at most this above the current version's
    feedback:                                  # optional
      database_url: sqlite:///feedback.db
      min_count: 20                            # below this many ratings, feedback is not judged
      max_mean_drop: 0.1
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.errors import ErrorKind, LorafleetError

if TYPE_CHECKING:
    from .report import EvalReport


class GateInvalid(LorafleetError):
    code = "invalid_gate"
    kind = ErrorKind.invalid


class AuditInvalid(LorafleetError):
    """`eval audit`'s attribute, labels or target cannot be used."""

    code = "invalid_audit"
    kind = ErrorKind.invalid


class GateRefused(LorafleetError):
    code = "gate_refused"
    kind = ErrorKind.conflict


class FeedbackGate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    database_url: str
    min_count: int = Field(20, ge=1)
    max_mean_drop: float = Field(0.1, ge=0, le=1)


class Gate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompts: list[str] = Field(default_factory=list)
    prompts_file: Path | None = None
    control: list[str] | None = None
    seeds: int = Field(8, ge=1, le=256)
    max_accuracy_drop: float = Field(0.05, ge=0, le=1)
    max_drift: float | None = Field(None, ge=0)
    max_drift_increase: float | None = Field(None, ge=0)
    feedback: FeedbackGate | None = None

    def all_prompts(self) -> list[str]:
        prompts = list(self.prompts)
        if self.prompts_file is not None:
            prompts += read_prompts(self.prompts_file)
        return prompts


def read_prompts(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    except OSError as exc:
        raise GateInvalid(f"cannot read prompts file {path}: {exc.strerror}", field="prompts") from exc


def load_gate(path: Path) -> Gate:
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
        return Gate.model_validate(tree)
    except OSError as exc:
        raise GateInvalid(f"cannot read gate {path}: {exc.strerror}", field="gate") from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise GateInvalid(f"invalid gate {path}: {exc}", field="gate") from exc


@dataclass
class Verdict:
    passed: bool
    reasons: list[str]


def judge(gate: Gate, report: "EvalReport", feedback: tuple[dict, dict] | None = None) -> Verdict:
    """Every threshold the candidate breaks (none: it passes). ``feedback``: (candidate's, current's)
    per-version aggregates, when the gate names a database."""
    reasons, overall = [], report.overall
    if report.reference is not None and "accuracy_reference" in overall:
        drop = overall["accuracy_reference"] - overall["accuracy_candidate"]
        if drop > gate.max_accuracy_drop:
            reasons.append(f"accuracy {overall['accuracy_candidate']:.3f} is {drop:.3f} below the current version's "
                           f"{overall['accuracy_reference']:.3f} (gate: {gate.max_accuracy_drop})")
    if gate.max_drift is not None and overall.get("drift_mean", 0.0) > gate.max_drift:
        reasons.append(f"drift {overall['drift_mean']:.2f} ({report.drift_unit}) is over {gate.max_drift}")
    if gate.max_drift_increase is not None and "drift_mean_reference" in overall:
        increase = overall.get("drift_mean", 0.0) - overall["drift_mean_reference"]
        if increase > gate.max_drift_increase:
            reasons.append(f"drift {overall['drift_mean']:.2f} is {increase:.2f} above the current version's "
                           f"{overall['drift_mean_reference']:.2f} (gate: {gate.max_drift_increase})")
    if gate.feedback is not None and feedback is not None:
        mine, theirs = feedback
        enough = mine and theirs and min(mine["count"], theirs["count"]) >= gate.feedback.min_count
        if enough:
            drop = theirs["mean_score"] - mine["mean_score"]
            if drop > gate.feedback.max_mean_drop:
                reasons.append(f"users rate it {mine['mean_score']:.3f}, {drop:.3f} below the current version "
                               f"(gate: {gate.feedback.max_mean_drop})")
    return Verdict(not reasons, reasons)
