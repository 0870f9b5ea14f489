"""Evaluation before promotion: `lorafleet eval` (a candidate against what an alias serves, or the
base), `lorafleet eval audit` (what a model draws for an under-specified prompt) and gated
promotion (`lorafleet registry promote ... --gate GATE.yaml`).

    stats.py      intervals, chi-square, KL
    scorers.py    what an image shows: the toy world's scorer, or CLIP from a local folder
    images.py     images from a lorafleet server (or one started here on a base)
    report.py     eval and audit runs, their JSON and self-contained HTML reports
    gates.py      promotion gates
"""
