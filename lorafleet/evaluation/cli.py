"""`lorafleet eval`, `lorafleet eval audit`, `lorafleet registry promote --gate`.

`eval audit` and `registry promote` are routed to `eval-audit` and `registry-promote` by
lorafleet/cli.py (their parents keep their own positional forms).
"""

from __future__ import annotations

# Imports inside functions: torch, transformers and the serving stack only when a command runs.
import json
import sys
import tempfile
from pathlib import Path

import yaml

from .gates import AuditInvalid, GateRefused, judge, load_gate, read_prompts

DEFAULT_SEEDS = 8


def _write(out: Path | None, name: str, document: dict, page: str) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(document, indent=2, default=str))
    (out / f"{name}.html").write_text(page)
    print(f"wrote {out / name}.json and .html", file=sys.stderr)


def control_prompts(args_control: Path | None, base: str) -> list[str]:
    if args_control is not None:
        return read_prompts(args_control)
    if base == "toy":
        from lorafleet.toyworld.concepts import BASE_CHECK_PROMPTS

        return sorted(BASE_CHECK_PROMPTS)[:6]
    return []


def _reference(registry, candidate: str, against: str | None) -> str | None:
    """'base' -> None; an alias or ref as given; default: the candidate name's prod alias, if any."""
    if against == "base":
        return None
    if against:
        return against
    name = candidate.split("@")[0].split(":")[0]
    return f"{name}:prod" if "prod" in registry.aliases(name) else None


def cmd_eval(args) -> int:
    from lorafleet.registry import AdapterRegistry

    from .images import server_images
    from .report import eval_html, run_eval
    from .scorers import scorer_for

    registry = AdapterRegistry(args.registry)
    reference = _reference(registry, args.candidate, args.against)
    prompts = read_prompts(Path(args.prompts))
    dataset = training_images(registry, args.candidate)
    with server_images(args.server, args.token, args.base, registry.uri) as source:
        report = run_eval(source, scorer_for(args.base, args.clip), args.candidate, reference, prompts,
                          control_prompts(args.control, args.base), args.seeds, dataset)
    document = {**report.to_json(), "digest": report.digest()}
    _write(Path(args.out) if args.out else None, "eval", document, eval_html(report))
    print(json.dumps(document, indent=2, default=str))
    return 0


def training_images(registry, candidate: str) -> list:
    """The candidate's training images, when its lineage names a stored dataset (else none)."""
    import numpy as np
    from PIL import Image

    from lorafleet.training.service.datasets import DatasetStore

    digest = registry.resolve(candidate).lineage.get("dataset")
    if not digest:
        return []
    with tempfile.TemporaryDirectory(prefix="lorafleet-eval-") as folder:
        files = DatasetStore(registry.store).materialize(digest, Path(folder))
        return [np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
                for path in sorted(files.iterdir()) if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")]


def _target(labels: list[str], target: str) -> dict[str, float]:
    if target == "uniform":
        return {label: 1 / len(labels) for label in labels}
    try:
        tree = yaml.safe_load(Path(target).read_text())
        shares = {label: float(tree.get(label, 0)) for label in labels} if isinstance(tree, dict) else {}
    except (OSError, yaml.YAMLError, TypeError, ValueError) as exc:
        raise AuditInvalid(f"--target {target}: {exc}", field="target") from exc
    total = sum(shares.values())
    if total <= 0 or min(shares.values()) < 0:
        raise AuditInvalid(f"--target {target}: a mapping of label -> share (not negative, some above 0)",
                           field="target")
    return {label: share / total for label, share in shares.items()}


def cmd_audit(args) -> int:
    from lorafleet.registry import AdapterRegistry

    from .images import server_images
    from .report import audit_html, run_audit
    from .scorers import scorer_for

    labels = args.labels.split(",") if args.labels else _default_labels(args.attribute)
    if not labels:
        raise AuditInvalid(f"--attribute {args.attribute}: no labels known for it; name them with --labels "
                           "(the toy scorer reads colour and shape)", field="attribute")
    target = _target(labels, args.target)
    registry = AdapterRegistry(args.registry)
    scorer = scorer_for(args.base, args.clip)
    with server_images(args.server, args.token, args.base, registry.uri) as source:
        report = run_audit(source, scorer, args.prompt, args.attribute, labels, target, args.seeds, args.adapter,
                           args.first_seed)
        before = (run_audit(source, scorer, args.prompt, args.attribute, labels, target, args.seeds,
                            first_seed=args.first_seed) if args.adapter else None)
    document = {"audit": report.to_json(), "base": before.to_json() if before else None}
    _write(Path(args.out) if args.out else None, "audit", document, audit_html(report, before))
    print(json.dumps(document, indent=2, default=str))
    return 0


def _default_labels(attribute: str) -> list[str]:
    from lorafleet.toyworld.base_model import BASE_COLOURS, BASE_SHAPES

    return list({"colour": BASE_COLOURS, "shape": BASE_SHAPES}.get(attribute, ()))


def cmd_promote(args) -> int:
    from lorafleet.registry import AdapterRef, AdapterRegistry

    from .images import server_images
    from .report import run_eval
    from .scorers import scorer_for

    gate = load_gate(Path(args.gate))
    registry = AdapterRegistry(args.registry)
    ref = AdapterRef.parse(args.candidate, field="candidate")
    candidate = registry.resolve(ref)
    aliases = registry.aliases(candidate.name)
    reference = f"{candidate.name}@{aliases[args.alias]}" if args.alias in aliases else None
    control = gate.control if gate.control is not None else control_prompts(None, args.base)
    with server_images(args.server, args.token, args.base, registry.uri) as source:
        report = run_eval(source, scorer_for(args.base, args.clip), f"{candidate.name}@{candidate.version}",
                          reference, gate.all_prompts(), control, gate.seeds)
    verdict = judge(gate, report, _feedback(gate, candidate.name, candidate.version, aliases.get(args.alias)))
    document = {**report.to_json(), "gate": gate.model_dump(mode="json"), "passed": verdict.passed,
                "reasons": verdict.reasons}
    if not verdict.passed:
        print(json.dumps(document, indent=2, default=str))
        raise GateRefused(f"{candidate.name}@{candidate.version} does not pass the gate for {args.alias}: "
                          + "; ".join(verdict.reasons), field="gate")
    digest = registry.store_evidence(document)
    record = registry.set_alias(candidate.name, args.alias, candidate.version, evidence=digest,
                                expected_version=aliases.get(args.alias))
    print(f"{candidate.name}:{args.alias} -> {candidate.name}@{record.version} (eval report {digest})")
    return 0


def _feedback(gate, name: str, version: int, current: int | None) -> tuple[dict, dict] | None:
    if gate.feedback is None or current is None:
        return None
    from lorafleet.serve.feedback import FeedbackStore

    by_version = FeedbackStore(gate.feedback.database_url).by_version(name)
    pick = {v: f.model_dump() for v, f in by_version.items()}
    return pick.get(version, {}), pick.get(current, {})


def _source_arguments(parser) -> None:
    parser.add_argument("--server", help="a running lorafleet server (default: start one here on --base)")
    parser.add_argument("--token", help="a token with the generate scope")
    parser.add_argument("--base", default="toy", help="the base to serve when no --server (default toy)")
    parser.add_argument("--registry", help="registry URI")
    parser.add_argument("--clip", type=Path, help="a local CLIP model folder (real bases)")


def add_commands(subparsers) -> None:
    evaluate = subparsers.add_parser("eval", help="evaluate a candidate adapter against a reference or the base; "
                                     "`eval audit`: an attribute's distribution for a prompt")
    evaluate.add_argument("candidate", help="adapter ref, e.g. my-style@5")
    evaluate.add_argument("--against", help="a ref, or 'base' (default: NAME:prod when it exists)")
    evaluate.add_argument("--prompts", required=True, help="a file with one prompt per line")
    evaluate.add_argument("--control", type=Path, help="control prompts for drift (default on toy: its own)")
    evaluate.add_argument("--seeds", type=int, default=DEFAULT_SEEDS)
    evaluate.add_argument("--out", help="write eval.json and eval.html here")
    _source_arguments(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    audit = subparsers.add_parser("eval-audit", prog="lorafleet eval audit",
                                  help="`eval audit`: an attribute's distribution over seeds, against a target")
    audit.add_argument("--prompt", required=True)
    audit.add_argument("--attribute", required=True, help="colour or shape on toy; any with --clip and --labels")
    audit.add_argument("--labels", help="comma-separated labels (default on toy: the base's colours or shapes)")
    audit.add_argument("--target", default="uniform", help="uniform, or a YAML file of label: share")
    audit.add_argument("--adapter", help="audit with this adapter (and the base, for before/after)")
    audit.add_argument("--seeds", type=int, default=64)
    audit.add_argument("--first-seed", type=int, default=1000,
                       help="seeds first-seed, first-seed + 1, ... (audit a dataset's correction on seeds other "
                       "than those used to choose it)")
    audit.add_argument("--out", help="write audit.json and audit.html here")
    _source_arguments(audit)
    audit.set_defaults(handler=cmd_audit)

    promote = subparsers.add_parser("registry-promote", prog="lorafleet registry promote",
                                    help="`registry promote NAME@V --alias A --gate G.yaml`: a gated alias move")
    promote.add_argument("candidate")
    promote.add_argument("--alias", required=True)
    promote.add_argument("--gate", required=True, help="the gate (YAML; see lorafleet/evaluation/gates.py)")
    _source_arguments(promote)
    promote.set_defaults(handler=cmd_promote)
