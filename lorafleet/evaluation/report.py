"""Eval and audit runs, and their reports: JSON, and self-contained HTML (images and matplotlib
plots inlined as base64 PNG: it opens offline).

Eval: for each prompt, the candidate's accuracy (and the reference's, and the base's) with 95 %
intervals and its diversity across seeds (mean pairwise distance of embeddings); on control
prompts (the base's own), the drift the candidate causes (same prompt and seed, with and without
it). Audit: an attribute's distribution over many seeds for one prompt, with Wilson intervals,
a chi-square test against the target distribution and KL(observed || target).
"""

from __future__ import annotations

# Imports inside functions: matplotlib and PIL only when a report is drawn.
import base64
import hashlib
import html
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from lorafleet.training.reporting import grid_pixels

from .gates import AuditInvalid
from .images import ServerImages
from .scorers import Scorer
from .stats import chi_square, kl_divergence, mean_interval, wilson


@dataclass
class Measure:
    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of_rate(cls, values: list[float]) -> "Measure":
        if values and all(v in (0.0, 1.0) for v in values):
            low, high = wilson(int(sum(values)), len(values))
            return cls(round(sum(values) / len(values), 4), round(low, 4), round(high, 4), len(values))
        return cls.of_values(values)

    @classmethod
    def of_values(cls, values: list[float]) -> "Measure":
        mean, low, high = mean_interval(values)
        return cls(round(mean, 4), round(low, 4), round(high, 4), len(values))


@dataclass
class PromptResult:
    prompt: str
    accuracy: dict[str, Measure]  # "candidate", "reference", "base"
    diversity: dict[str, float]


@dataclass
class DriftResult:
    prompt: str
    shift: Measure  # the candidate's
    reference_shift: Measure | None = None


@dataclass
class EvalReport:
    candidate: str
    reference: str | None
    scorer: str
    drift_unit: str
    seeds: int
    prompts: list[PromptResult]
    drift: list[DriftResult]
    overall: dict[str, float]
    grids: dict[str, list[list[np.ndarray]]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("grids")
        return data

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


def _diversity(scorer: Scorer, images: list[np.ndarray]) -> float:
    embeddings = scorer.embed(images)
    if len(embeddings) < 2:
        return 0.0
    distances = [float(np.linalg.norm(embeddings[i] - embeddings[j]))
                 for i in range(len(embeddings)) for j in range(i + 1, len(embeddings))]
    return round(float(np.mean(distances)), 4)


def _drift(source: ServerImages, scorer: Scorer, prompt: str, candidate: str, reference: str | None,
           seeds: int) -> DriftResult:
    """How far each adapter moves the base's own images of ``prompt`` (same seeds)."""
    without = source.images(prompt, None, seeds)

    def shift(ref: str) -> Measure:
        return Measure.of_values(scorer.drift(source.images(prompt, ref, seeds), without))

    return DriftResult(prompt, shift(candidate), shift(reference) if reference else None)


def fidelity(scorer: Scorer, images: list[np.ndarray], dataset: list[np.ndarray]) -> Measure:
    """How close each generated image is to its nearest training image (cosine of embeddings)."""
    ours, theirs = scorer.embed(images), scorer.embed(dataset)
    ours = ours / np.linalg.norm(ours, axis=1, keepdims=True).clip(1e-8)
    theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True).clip(1e-8)
    return Measure.of_values([float(v) for v in (ours @ theirs.T).max(axis=1)])


def run_eval(source: ServerImages, scorer: Scorer, candidate: str, reference: str | None, prompts: list[str],
             control: list[str], seeds: int, dataset: list[np.ndarray] | None = None) -> EvalReport:
    """``dataset``: the candidate's training images (from its lineage), for fidelity."""
    refs = {"candidate": candidate, "base": None, **({"reference": reference} if reference else {})}
    results, grids = [], {}
    for prompt in prompts:
        images = {role: source.images(prompt, ref, seeds) for role, ref in refs.items()}
        results.append(PromptResult(prompt, {role: Measure.of_rate(scorer.accuracy(prompt, shown))
                                             for role, shown in images.items()},
                                    {role: _diversity(scorer, shown) for role, shown in images.items()}))
        grids[prompt] = [images["base"], *([images["reference"]] if reference else []), images["candidate"]]
    drift = [_drift(source, scorer, prompt, candidate, reference, seeds) for prompt in control]
    overall = {f"accuracy_{role}": round(float(np.mean([r.accuracy[role].mean for r in results])), 4)
               for role in refs} if results else {}
    if dataset and grids:
        generated = [image for rows in grids.values() for image in rows[-1]]  # the candidate's row
        same_size = [image for image in dataset if image.shape == generated[0].shape]
        if same_size:
            overall["fidelity"] = fidelity(scorer, generated, same_size).mean
    if drift:
        shifts = [d.shift.mean for d in drift if d.shift.n]
        overall["drift_mean"] = round(float(np.mean(shifts)), 4) if shifts else 0.0
        overall["drift_max"] = round(float(np.max(shifts)), 4) if shifts else 0.0
        if reference:
            theirs = [d.reference_shift.mean for d in drift if d.reference_shift and d.reference_shift.n]
            overall["drift_mean_reference"] = round(float(np.mean(theirs)), 4) if theirs else 0.0
    return EvalReport(candidate, reference, scorer.name, scorer.drift_unit, seeds, results, drift, overall, grids)


@dataclass
class AuditReport:
    prompt: str
    attribute: str
    adapter: str | None
    seeds: int
    labels: list[str]
    counts: dict[str, int]
    unreadable: int
    shares: dict[str, Measure]
    target: dict[str, float]
    chi_square: float
    dof: int
    p_value: float
    kl: float
    first_seed: int = 1000  # the seeds were first_seed .. first_seed + seeds - 1

    def to_json(self) -> dict:
        return asdict(self)


def run_audit(source: ServerImages, scorer: Scorer, prompt: str, attribute: str, labels: list[str],
              target: dict[str, float], seeds: int, adapter: str | None = None, first_seed: int = 1000) -> AuditReport:
    found = scorer.labels(source.images(prompt, adapter, seeds, first_seed), attribute, labels)
    counts = Counter(label for label in found if label is not None)
    read = sum(counts.values())
    if read == 0:
        raise AuditInvalid(f"the scorer could read none of the {len(found)} images of {prompt!r} "
                           f"with {adapter or 'the base'} as one of {labels}: nothing to count (more seeds, "
                           "or other labels)", field="seeds")
    observed = [counts.get(label, 0) for label in labels]
    expected = [target.get(label, 0.0) for label in labels]
    statistic, dof, p_value = chi_square(observed, expected)
    shares = {label: Measure(round(counts.get(label, 0) / read, 4) if read else 0.0,
                             *(round(x, 4) for x in wilson(counts.get(label, 0), read)), read) for label in labels}
    return AuditReport(prompt, attribute, adapter, seeds, labels, {label: counts.get(label, 0) for label in labels},
                       len(found) - read, shares, target, round(statistic, 4), dof, p_value,
                       round(kl_divergence([s.mean for s in shares.values()], expected), 4), first_seed)


# ----------------------------------------------------------------------------- HTML
def _png(figure_or_image) -> str:
    buffer = io.BytesIO()
    if isinstance(figure_or_image, np.ndarray):
        from PIL import Image

        Image.fromarray(figure_or_image).save(buffer, format="PNG")
    else:
        figure_or_image.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def bar_chart(title: str, names: list[str], series: dict[str, list[Measure]], ylabel: str):
    """Grouped bars with their intervals as error bars (a matplotlib figure; the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3))
    width = 0.8 / max(1, len(series))
    for index, (label, measures) in enumerate(series.items()):
        x = np.arange(len(names)) + index * width
        means = [m.mean for m in measures]
        errors = [[m.mean - m.low for m in measures], [m.high - m.mean for m in measures]]
        axis.bar(x, means, width, yerr=errors, capsize=3, label=label)
    axis.set_xticks(np.arange(len(names)) + width * (len(series) - 1) / 2, names, rotation=20, ha="right")
    axis.set_title(title)
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=8)
    return figure


def _bars(title: str, names: list[str], series: dict[str, list[Measure]], ylabel: str) -> str:
    import matplotlib.pyplot as plt

    figure = bar_chart(title, names, series, ylabel)
    encoded = _png(figure)
    plt.close(figure)
    return encoded


def eval_html(report: EvalReport) -> str:
    roles = list(report.prompts[0].accuracy) if report.prompts else []
    parts = [f"<h1>lorafleet eval: {html.escape(report.candidate)}</h1>",
             f"<p>against {html.escape(report.reference or 'the base')}; {report.seeds} seeds; scorer "
             f"{html.escape(report.scorer)}</p>",
             "<pre>" + html.escape(json.dumps(report.overall, indent=2)) + "</pre>"]
    if report.prompts:
        names = [r.prompt for r in report.prompts]
        accuracy = {role: [r.accuracy[role] for r in report.prompts] for role in roles}
        parts.append(f'<img src="{_bars("Prompt accuracy (95 % intervals)", names, accuracy, "accuracy")}">')
    if report.drift:
        shifts = {"candidate": [d.shift for d in report.drift]}
        chart = _bars("Drift on control prompts", [d.prompt for d in report.drift], shifts, report.drift_unit)
        parts.append(f'<img src="{chart}">')
    for prompt, rows in report.grids.items():
        label = "base | reference | candidate" if report.reference else "base | candidate"
        parts.append(f"<h3>{html.escape(prompt)} <small>(rows: {label})</small></h3>"
                     f'<img src="{_png(grid_pixels(rows))}">')
    return _page("lorafleet eval", parts)


def audit_chart(report: AuditReport, before: AuditReport | None = None):
    """The attribute's shares (95 % intervals) with the adapter, the base's before it, and the target."""
    series = {**({f"before (KL {before.kl:.2f})": [before.shares[label] for label in report.labels]}
                 if before else {}),
              f"{report.adapter or 'base'} (KL {report.kl:.2f})": [report.shares[label] for label in report.labels],
              "target": [Measure(report.target.get(label, 0.0), report.target.get(label, 0.0),
                                 report.target.get(label, 0.0), 0) for label in report.labels]}
    return bar_chart(f"{report.attribute} for {report.prompt!r} (95 % intervals)", report.labels, series,
                     f"share of the readable images (of {report.seeds})")


def audit_html(report: AuditReport, before: AuditReport | None = None) -> str:
    import matplotlib.pyplot as plt

    figure = audit_chart(report, before)
    chart = _png(figure)
    plt.close(figure)
    parts = [f"<h1>lorafleet eval audit: {html.escape(report.prompt)}</h1>", f'<img src="{chart}">',
             "<pre>" + html.escape(json.dumps(report.to_json(), indent=2, default=str)) + "</pre>"]
    return _page("lorafleet audit", parts)


def _page(title: str, parts: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}img{image-rendering:pixelated;max-width:100%}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
