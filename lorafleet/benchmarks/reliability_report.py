"""`lorafleet bench reliability`: run the reliability tests and write docs/reliability.md from
the figures they record (`make soak` runs it with the larger soak parameters).

Run from a source checkout (the tests live in tests/). Each test records one row through the
`record` fixture into $LORAFLEET_RELIABILITY_RECORD; hostile-input and auth tables are counted
from pytest's JUnit report.
"""

from __future__ import annotations

# Imports inside functions: every benchmark's arguments are added when the parser is built; its
# heavy imports wait for its run.
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from .registry_bench import emit

RECORDING_TESTS = [
    "tests/reliability",
    "tests/serve/test_ray_serve.py::test_registry_outage_cached_adapters_keep_serving",
    "tests/serve/test_ray_serve.py::test_a_killed_replica_is_replaced_and_no_client_hangs",
]
TABLE_TESTS = {  # test function -> what its parametrized cases cover
    "test_bad_requests_get_json_errors_naming_the_field": "hostile API bodies (traversal refs, huge/negative/NaN "
                                                          "numbers, long prompts)",
    "test_undecodable_bodies_are_422_not_500": "non-UTF-8 / non-JSON bodies",
    "test_bad_adapter_files_are_refused_and_nothing_is_stored": "hostile adapter files (pickle, huge header claims, "
                                                                "NaN, truncated)",
    "test_bad_names_are_refused": "adapter names with traversal and bad characters",
    "test_bad_references_are_refused": "adapter references",
    "test_size_limits_are_enforced": "oversized adapter files",
    "test_bad_files_are_skipped_and_reported_never_a_crash": "training folder with a decompression bomb",
    "test_every_route_checks_its_scope": "auth: every route x no / wrong / under-scoped token",
    "test_sources_never_unpickle_or_trust_remote_code": "no pickle loading, no trust_remote_code",
    "test_publishing_to_a_read_only_directory_fails_cleanly": "registry on a read-only disk",
}
SECURITY_TESTS = {  # the security model (docs/operations.md): test function -> what it covers
    "test_every_header_length_from_8_to_4096_bytes_is_read_as_safetensors": "safetensors decided by parsing "
                                                                             "(header lengths 8-4,096 bytes)",
    "test_pickle_and_torch_files_named_safetensors_are_still_refused_as_pickle": "pickle 2-5, torch zip, truncated",
    "test_hostile_json_headers_are_invalid_adapters": "200k-deep JSON, 5,000-digit integers",
    "test_forged_manifests_are_refused_on_read": "manifests edited in storage (traversal names, key mismatch)",
    "test_a_non_finite_alpha_is_refused_and_nothing_is_stored": "NaN/inf in manifests",
    "test_s3_failures_are_one_line_errors": "S3 errors (missing/invalid bucket, access denied, unreachable)",
    "test_misses_are_cached_for_the_ttl": "registry-call amplification by bad references",
    "test_schema_and_metrics_need_a_scope": "scopes of /metrics and /openapi.json",
    "test_unsafe_or_inconsistent_settings_are_refused_at_start_up": "weak tokens, public address without auth, "
                                                                     "inconsistent limits",
    "test_hostile_files_are_skipped_and_reported_never_read": "training data: symlinks, FIFOs, EPS, oversized",
    "test_unauthenticated_30mb_bodies_do_not_grow_server_memory": "auth and body limit before the body is read",
    "test_every_pod_is_hardened_and_uses_ray_token_auth": "k8s securityContexts and Ray token auth",
    "test_network_policies_admit_the_serve_port_from_the_ingress_and_ray_ports_from_the_cluster": "k8s "
                                                                                                   "NetworkPolicies",
}
TABLE_FILES = ["tests/serve/test_api.py", "tests/registry/test_bad_input.py", "tests/training/test_data.py",
               "tests/test_no_pickle.py", "tests/registry/test_safetensors_parsing.py",
               "tests/registry/test_stored_state.py", "tests/registry/test_s3_errors.py",
               "tests/serve/test_resolver.py", "tests/serve/test_security.py", "tests/k8s/test_manifests.py"]


def run_reliability(soak: bool, root: Path) -> tuple[int, list[dict], dict[str, tuple[int, int]]]:
    """(pytest exit code, recorded rows, {table test: (passed, failed)})."""
    with tempfile.TemporaryDirectory() as scratch:
        record = Path(scratch) / "rows.jsonl"
        junit = Path(scratch) / "junit.xml"
        env = {**os.environ, "LORAFLEET_RELIABILITY_RECORD": str(record), "LORAFLEET_SOAK": "1" if soak else "0"}
        table_filter = " or ".join([*TABLE_TESTS, *SECURITY_TESTS])
        first = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *RECORDING_TESTS],
                               cwd=root, env=env)
        second = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TABLE_FILES,
                                 "-k", table_filter, f"--junitxml={junit}"], cwd=root, env=env)
        rows = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
        tables = _count_cases(junit) if junit.exists() else {}
    return first.returncode or second.returncode, rows, tables


def _count_cases(junit: Path) -> dict[str, tuple[int, int]]:
    passed, failed = Counter(), Counter()
    for case in ElementTree.parse(junit).iter("testcase"):
        function = case.get("name", "").split("[", 1)[0]
        if any(child.tag in ("failure", "error") for child in case):
            failed[function] += 1
        elif not any(child.tag == "skipped" for child in case):
            passed[function] += 1
    return {name: (passed[name], failed[name]) for name in [*TABLE_TESTS, *SECURITY_TESTS]
            if passed[name] or failed[name]}


def _cells(values: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items())


def render_markdown(rows: list[dict], tables: dict[str, tuple[int, int]], exit_code: int, soak: bool) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "make soak" if soak else "lorafleet bench reliability"
    lines = [
        "# Reliability report",
        "",
        f"Generated by `{command}` on {now}: {os.cpu_count()} CPU cores, {platform.machine()}, "
        f"{'CUDA' if _has_cuda() else 'no GPU'}; parameters: {'soak' if soak else 'CI (bounded)'}. "
        f"Tests {'passed' if exit_code == 0 else 'FAILED (exit code %d)' % exit_code}.",
        "",
        "Every row is an automated test; the same tests run in `make test` with the bounded parameters.",
        "",
        "| Test | Parameters | Figures |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {row['test']} | {_cells(row['parameters'])} | {_cells(row['figures'])} |" for row in rows]
    lines += ["", "## Hostile input and auth tables", "", "| Test | Covers | Cases passed | Failed |",
              "| --- | --- | --- | --- |"]
    lines += [f"| `{name}` | {TABLE_TESTS[name]} | {passed} | {failed} |" for name, (passed, failed) in tables.items()
              if name in TABLE_TESTS]
    lines += ["", "## Security model", "",
              "Who can do what, what is validated where, and what an operator must configure: the \"Security "
              "model\" section of docs/operations.md. These tests hold it:", "",
              "| Test | Covers | Cases passed | Failed |", "| --- | --- | --- | --- |"]
    lines += [f"| `{name}` | {SECURITY_TESTS[name]} | {passed} | {failed} |"
              for name, (passed, failed) in tables.items() if name in SECURITY_TESTS]
    return "\n".join(lines) + "\n"


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def cmd_bench_reliability(args) -> int:
    root = Path(args.root).resolve()
    if not (root / "tests" / "reliability").is_dir():
        print(f"error: {root} is not a lorafleet source checkout (tests/reliability is missing); use --root",
              file=sys.stderr)
        return 2
    exit_code, rows, tables = run_reliability(args.soak, root)
    output = root / args.output
    output.write_text(render_markdown(rows, tables, exit_code, args.soak))
    emit([{"test": r["test"], **r["figures"]} for r in rows] or [{"test": "none recorded"}],
         ["test", "requests", "ok", "errors", "503", "p99_ms", "rss_growth_mb", "replaced_after_s"])
    print(f"wrote {output}" + ("" if exit_code == 0 else f"; tests FAILED (exit code {exit_code})"))
    return exit_code


def add_arguments(parser) -> None:
    parser.add_argument("--soak", action="store_true", help="the larger soak parameters (longer runs)")
    parser.add_argument("--output", default="docs/reliability.md", help="report path, relative to --root")
    parser.add_argument("--root", default=".", help="the source checkout holding tests/")
    parser.set_defaults(handler=cmd_bench_reliability)
