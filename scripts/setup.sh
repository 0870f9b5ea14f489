#!/usr/bin/env bash
# Creates .venv and installs everything lorafleet and its tests need, on a fresh machine.
# torch goes first and pinned (a CPU wheel lies on disk here; an unpinned torch pulls a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[test]"

# Debian packages the tests use: promtool (package prometheus) checks /metrics and alert rules.
if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    else
        echo "note: promtool not found; install the Debian package 'prometheus' for the metrics tests" >&2
    fi
fi
touch "$VENV/.installed"
