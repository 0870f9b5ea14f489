"""Evaluation on `toy`, through a real server: eval ranks a known-good adapter above a damaged
one (accuracy and drift); the audit detects a skew made on purpose (chi-square, KL) and measures a
corrective adapter trained on a balanced set; a gate refuses a worse candidate and lets a good
one through, recording the eval report's digest in the alias history. Plus the statistics."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import yaml

from lorafleet.bases import base_spec
from lorafleet.evaluation.stats import chi_square, kl_divergence, mean_interval, wilson
from lorafleet.registry import AdapterRegistry, PublishRequest
from lorafleet.toyworld.scorer import hue_distance
from lorafleet.training.service.datasets import DatasetStore

CLI = [sys.executable, "-m", "lorafleet.cli"]


def test_statistics_match_their_definitions():
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    statistic, dof, p = chi_square([30, 10, 10, 10], [0.25] * 4)
    assert statistic == pytest.approx(20.0) and dof == 3 and p == pytest.approx(1.697e-4, rel=1e-2)
    assert chi_square([10, 10, 10, 10], [0.25] * 4)[2] == pytest.approx(1.0)
    assert kl_divergence([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.0, abs=1e-9)
    assert kl_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(0.6931, abs=1e-3)
    assert hue_distance(350, 10) == 20 and mean_interval([1.0, 1.0])[1:] == (1.0, 1.0)


def _train(workdir, registry, name: str, colours: tuple[str, ...], seed: int = 0):
    """A LoRA on 16 circles of ``colours``, every caption just 'a circle'."""
    from lorafleet.toyworld.world import write_dataset
    from lorafleet.training.config import load_train_config
    from lorafleet.training.loop import train
    from lorafleet.training.publish import publish_result

    data = workdir / f"data-{name}"
    write_dataset(data, 16, seed=seed, shapes=("circle",), colours=colours)
    for caption in data.glob("*.txt"):
        caption.write_text("a circle")
    config = load_train_config(None, [f"data.path={data}", f"output_dir={workdir / name}", "max_steps=200",
                                      "batch_size=8", "optimizer.learning_rate=0.002", "lora.rank=8",
                                      "lora.alpha=8", "data.trigger_mode=none",
                                      "lora.target_modules=[attn2.to_q, attn2.to_k, attn2.to_v, attn2.to_out.0]"])
    return publish_result(train(config), config, registry, name)


@pytest.fixture(scope="module")
def toy_adapters(tmp_path_factory):
    from lorafleet.toyworld.concepts import train_and_publish

    workdir = tmp_path_factory.mktemp("evaluation")
    registry = AdapterRegistry(f"file://{workdir / 'registry'}")
    good = train_and_publish("lora", workdir / "good", registry, name="eval-style", aliases=["prod"])
    damaged = good.payload.__class__(good.payload.format, {k: v * 6 if "lora_B" in k else v for k, v in
                                                           good.payload.tensors.items()},
                                     good.payload.components, source_format="damaged")
    spec = base_spec("toy")
    registry.publish_payload(damaged, PublishRequest(name="eval-style", base=spec))  # v2: damaged
    registry.publish_payload(good.payload, PublishRequest(name="eval-style", base=spec))  # v3: the good one again
    # v4: the good one, with its training set stored and named in its lineage (for fidelity)
    archive = workdir / "data.tar"
    with tarfile.open(archive, "w") as packed:
        for path in sorted((workdir / "good" / "data").iterdir()):
            packed.add(path, path.name)
    dataset = DatasetStore(registry.store).ingest_archive(archive).digest
    registry.publish_payload(good.payload, PublishRequest(name="eval-style", base=spec, lineage={"dataset": dataset}))
    return workdir, registry, good


pytestmark_slow = pytest.mark.slow


@pytestmark_slow
def test_eval_ranks_the_good_adapter_above_the_damaged_one(toy_adapters):
    workdir, registry, good = toy_adapters
    prompts = workdir / "prompts.txt"
    prompts.write_text("\n".join(good.prompts) + "\n")
    out = workdir / "eval-out"
    result = subprocess.run(CLI + ["eval", "eval-style@4", "--against", "eval-style@2", "--prompts", str(prompts),
                                   "--seeds", "8", "--registry", registry.uri, "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    overall = report["overall"]
    assert overall["accuracy_candidate"] > overall["accuracy_reference"], overall
    assert overall["drift_mean"] < overall["drift_mean_reference"], overall
    assert 0.5 < overall["fidelity"] <= 1.0  # cosine to the nearest training image (its lineage's dataset)
    first = report["prompts"][0]["accuracy"]["candidate"]
    assert first["low"] <= first["mean"] <= first["high"] and first["n"] == 8
    page = (out / "eval.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "http" not in page.replace("http-equiv", "")


@pytestmark_slow
def test_a_gate_refuses_the_damaged_version_and_promotes_the_good_one(toy_adapters):
    workdir, registry, good = toy_adapters
    gate = workdir / "gate.yaml"
    gate.write_text(yaml.safe_dump({"prompts": list(good.prompts), "seeds": 8, "max_accuracy_drop": 0.1,
                                    "max_drift_increase": 5.0,
                                    "control": ["a red circle", "a blue square", "a yellow triangle"]}))
    base = CLI + ["registry", "promote"]
    refused = subprocess.run(base + ["eval-style@2", "--alias", "prod", "--gate", str(gate), "--registry",
                                     registry.uri], capture_output=True, text=True, timeout=900)
    assert refused.returncode == 1 and "does not pass the gate" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
    assert registry.alias_record("eval-style", "prod").version == 1
    promoted = subprocess.run(base + ["eval-style@3", "--alias", "prod", "--gate", str(gate), "--registry",
                                      registry.uri], capture_output=True, text=True, timeout=900)
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    record = registry.alias_record("eval-style", "prod")
    assert record.version == 3 and record.history[-1].evidence.startswith("sha256:")
    stored = registry.evidence(record.history[-1].evidence)
    assert stored["passed"] is True and stored["candidate"] == "eval-style@3"


@pytestmark_slow
def test_a_gate_refuses_a_candidate_its_users_rate_worse_than_the_current_version(toy_adapters):
    """Feedback stored by the server's own store (a real SQLite database) decides when the eval does not."""
    from lorafleet.serve.feedback import FeedbackStore, StarFeedback

    workdir, registry, good = toy_adapters
    current = registry.aliases("eval-style")["prod"]
    database = f"sqlite:///{workdir / 'feedback.db'}"
    store = FeedbackStore(database)
    for index in range(20):
        for version, stars in ((current, 5), (4, 2)):
            request_id = f"req-{version:02x}{index:022x}"
            store.record_request(request_id, None, [("eval-style", version)])
            store.rate(StarFeedback(request_id=request_id, rating=stars), None)

    def promote(max_mean_drop: float, min_count: int = 20) -> subprocess.CompletedProcess:
        gate = workdir / "feedback-gate.yaml"
        gate.write_text(yaml.safe_dump({"prompts": list(good.prompts)[:2], "seeds": 2, "max_accuracy_drop": 1.0,
                                        "control": [], "feedback": {"database_url": database, "min_count": min_count,
                                                                    "max_mean_drop": max_mean_drop}}))
        return subprocess.run(CLI + ["registry", "promote", "eval-style@4", "--alias", "prod", "--gate", str(gate),
                                     "--registry", registry.uri], capture_output=True, text=True, timeout=900)

    refused = promote(0.1)
    assert refused.returncode == 1 and "users rate it 0.250, 0.750 below" in refused.stderr, refused.stderr[-2000:]
    assert registry.aliases("eval-style")["prod"] == current
    too_few = promote(0.1, min_count=21)  # below min_count ratings, feedback is not judged
    assert too_few.returncode == 0, too_few.stderr[-2000:]
    assert registry.aliases("eval-style")["prod"] == 4


@pytestmark_slow
def test_the_audit_detects_a_skew_and_measures_a_correction(tmp_path):
    from lorafleet.evaluation.images import server_images
    from lorafleet.evaluation.report import run_audit
    from lorafleet.evaluation.scorers import ToyScorer
    from lorafleet.toyworld.base_model import BASE_COLOURS
    from lorafleet.toyworld.concepts import BASE_CHECK_PROMPTS
    from lorafleet.toyworld.correction import AUDIT_PROMPT, train_correction

    torch.manual_seed(0)
    registry = AdapterRegistry(f"file://{tmp_path / 'registry'}")
    _train(tmp_path, registry, "skew-red", ("red",))
    train_correction(tmp_path, registry, name="balanced")
    labels = list(BASE_COLOURS)
    uniform = {label: 1 / len(labels) for label in labels}
    specified = sorted(BASE_CHECK_PROMPTS)[::4]
    scorer = ToyScorer()
    with server_images(None, None, "toy", registry.uri) as source:
        audits = {ref: run_audit(source, scorer, AUDIT_PROMPT, "colour", labels, uniform, 64, ref)
                  for ref in (None, "skew-red@1", "balanced@1")}
        kept = {ref: np.mean([np.mean(scorer.accuracy(p, source.images(p, ref, 4))) for p in specified])
                for ref in (None, "balanced@1")}
    base, skewed, corrected = audits[None], audits["skew-red@1"], audits["balanced@1"]
    assert base.p_value < 1e-3 and base.kl > 0.5, base  # the base's own skew is detected
    assert skewed.shares["red"].mean > 0.5 and skewed.p_value < 1e-3, skewed  # a skew made on purpose too
    assert corrected.kl < base.kl / 2, (base, corrected)  # the correction halves the divergence at least
    assert corrected.p_value > 0.05, corrected  # ... to a distribution not distinguishable from uniform (0.31)
    assert corrected.unreadable <= 20, corrected  # ... with most images one clean colour (22 of 64 before guided targets)
    assert kept["balanced@1"] >= kept[None] - 0.15, kept  # and specified prompts keep their colour and shape
    figures = {ref or "base": {"red": a.shares["red"].mean, "kl": a.kl, "p": a.p_value, "unreadable": a.unreadable}
               for ref, a in audits.items()}
    print("audit:", json.dumps(figures), "specified:", kept)


@pytestmark_slow
def test_the_audit_command_reports_its_seeds_and_refuses_an_unknown_attribute(toy_adapters):
    workdir, registry, _ = toy_adapters
    out = workdir / "audit-out"
    command = CLI + ["eval", "audit", "--prompt", "a circle", "--seeds", "6", "--first-seed", "2000",
                     "--registry", registry.uri]
    result = subprocess.run(command + ["--attribute", "colour", "--out", str(out)], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads((out / "audit.json").read_text())
    audit = document["audit"]
    assert audit["first_seed"] == 2000 and audit["seeds"] == 6 and audit["adapter"] is None
    assert sum(audit["counts"].values()) + audit["unreadable"] == 6 and document["base"] is None
    assert "&quot;first_seed&quot;: 2000" in (out / "audit.html").read_text()  # the page says which seeds
    refused = subprocess.run(command + ["--attribute", "mood"], capture_output=True, text=True, timeout=900)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "mood" in refused.stderr, refused.stderr[-2000:]


def test_an_audit_target_file_is_read_or_refused_naming_the_option(tmp_path):
    from lorafleet.evaluation.cli import _target
    from lorafleet.evaluation.gates import AuditInvalid

    good = tmp_path / "target.yaml"
    good.write_text("red: 3\nblue: 1\ngreen: 9\n")  # green is not audited: shares over the labels only
    assert _target(["red", "blue"], str(good)) == {"red": 0.75, "blue": 0.25}
    for name, text in (("list.yaml", "- red\n- blue\n"), ("negative.yaml", "red: -1\nblue: 2\n"),
                       ("zero.yaml", "red: 0\n"), ("words.yaml", "red: many\n"), ("broken.yaml", "red: [\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(AuditInvalid) as refused:
            _target(["red", "blue"], str(tmp_path / name))
        assert refused.value.field == "target", name
    with pytest.raises(AuditInvalid, match="No such file"):
        _target(["red"], str(tmp_path / "missing.yaml"))


def test_an_audit_with_no_readable_image_is_refused_not_divided_by_zero():
    from lorafleet.evaluation.gates import AuditInvalid
    from lorafleet.evaluation.report import run_audit
    from lorafleet.evaluation.scorers import ToyScorer

    class BlankImages:  # the image source's interface; blank images, which the real scorer cannot read
        def images(self, prompt, ref, seeds, first_seed=1000):
            return [np.zeros((32, 32, 3), dtype=np.uint8) for _ in range(seeds)]

    with pytest.raises(AuditInvalid, match="none of the 5 images") as refused:
        run_audit(BlankImages(), ToyScorer(), "a circle", "colour", ["red", "blue"], {"red": 0.5, "blue": 0.5}, 5)
    assert refused.value.field == "seeds"


@pytestmark_slow
def test_clip_scores_labels_and_drift_on_real_base_code_paths(toy_adapters, tmp_path):
    """The CLIP scorer (a tiny CLIP folder built here, loaded by transformers as any local one)."""
    from lorafleet.devtools.tiny_models import build_tiny_clip
    from lorafleet.evaluation.images import server_images
    from lorafleet.evaluation.report import run_audit, run_eval
    from lorafleet.evaluation.scorers import ClipScorer

    _, registry, good = toy_adapters
    scorer = ClipScorer(build_tiny_clip(tmp_path / "clip"))
    with server_images(None, None, "toy", registry.uri) as source:
        report = run_eval(source, scorer, "eval-style@1", None, list(good.prompts)[:1], ["a red circle"], 2)
        audit = run_audit(source, scorer, "a circle", "colour", ["red", "blue"], {"red": 0.5, "blue": 0.5}, 4)
    accuracy = report.prompts[0].accuracy["candidate"]
    assert 0 <= accuracy.mean <= 1 and accuracy.n == 2
    assert report.drift[0].shift.n == 2 and 0 <= report.drift[0].shift.mean <= 2
    assert sum(audit.counts.values()) == 4 and audit.unreadable == 0 and audit.p_value <= 1
