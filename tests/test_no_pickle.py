"""No code path of ours loads pickle or runs a model's remote code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("registry", "serve", "training", "lorafleet") for p in (ROOT / folder).rglob("*.py")]
FORBIDDEN = [
    (re.compile(r"\btorch\.load\("), "torch.load"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\bcloudpickle\.loads?\("), "cloudpickle.load"),
    (re.compile(r"trust_remote_code\s*=\s*True"), "trust_remote_code=True"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
]


def test_sources_never_unpickle_or_trust_remote_code():
    assert len(SOURCES) > 20
    found = []
    for path in SOURCES:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, name in FORBIDDEN:
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {name}")
    assert found == []


def test_the_check_would_catch_an_offender():
    assert any(p.search("state = torch.load(path)") for p, _ in FORBIDDEN)
    assert any(p.search("AutoModel.from_pretrained(x, trust_remote_code=True)") for p, _ in FORBIDDEN)
