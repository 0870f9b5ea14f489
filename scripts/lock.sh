#!/usr/bin/env bash
# Refreshes requirements.lock on purpose: resolves pyproject.toml's ranges (plus the test extra) to
# exact versions with hashes, then checks the new lock by installing it into a fresh venv and
# running the fast tests there. The old lock is kept when the check fails.
#   make lock              # refresh and check
#   SKIP_CHECK=1 make lock # refresh only; `make test` then installs it (setup re-runs on a new lock)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$PYTHON" -m venv "$tools/venv"
"$tools/venv/bin/pip" install --quiet "pip==26.3" "pip-tools==7.6.2"
# The current pins are kept unless UPGRADE=1: a refresh adds what pyproject.toml now asks for and
# moves only what it must (pip-compile keeps the versions of an existing output file).
[ "${UPGRADE:-0}" = "1" ] || cp requirements.lock "$tools/requirements.lock"
"$tools/venv/bin/pip-compile" pyproject.toml --extra test --generate-hashes --allow-unsafe \
    --strip-extras --no-emit-index-url --no-emit-find-links --quiet \
    --constraint requirements/constraints-lock.txt --output-file "$tools/requirements.lock"
# pip-compile names its temporary output path in the header; name the real file instead.
sed -i "s#$tools/requirements.lock#requirements.lock#; s#--constraint=[^ ]*constraints-lock.txt#--constraint=requirements/constraints-lock.txt#" "$tools/requirements.lock"
if cmp -s "$tools/requirements.lock" requirements.lock; then
    echo "requirements.lock is already current"
    exit 0
fi
diff <(grep -E '^[A-Za-z0-9_.-]+==' requirements.lock | sed 's/ .*//') \
     <(grep -E '^[A-Za-z0-9_.-]+==' "$tools/requirements.lock" | sed 's/ .*//') || true
if [ "${SKIP_CHECK:-0}" != "1" ]; then
    echo "checking the new lock in a fresh venv (fast tests)..."
    VENV="$tools/check" LOCK="$tools/requirements.lock" bash scripts/setup.sh
    "$tools/check/bin/python" -m pytest -m "not slow" -q -p no:cacheprovider
fi
cp "$tools/requirements.lock" requirements.lock
echo "requirements.lock refreshed; commit it with the figures of the check above"
