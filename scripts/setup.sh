#!/usr/bin/env bash
# Creates .venv and installs everything lorafleet and its tests need, on a fresh machine, from
# requirements.lock: exact versions with hashes, so an install on any later day is the same build
# (torch is the CPU wheel that lies on disk here). Refresh the lock with `make lock`; see what the
# newest versions in range would break with `make check-latest`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
LOCK=${LOCK:-requirements.lock}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet "pip==26.3"
"$VENV/bin/python" -m pip install --quiet --require-hashes --no-deps -r "$LOCK"
# The project itself: no dependency resolution (the lock is the whole build), no build isolation
# (setuptools comes from the lock too).
"$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
"$VENV/bin/python" -m pip check

# Debian packages the tests use: promtool (package prometheus) checks /metrics and alert rules;
# PostgreSQL (package postgresql) is the shared feedback database the tests start on loopback.
debian=()
command -v promtool >/dev/null 2>&1 || debian+=(prometheus)
command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || debian+=(postgresql)
if [ "${#debian[@]}" -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${debian[@]}" >/dev/null
    else
        echo "note: install the Debian packages ${debian[*]} for the metrics and feedback tests" >&2
    fi
fi
touch "$VENV/.installed"
