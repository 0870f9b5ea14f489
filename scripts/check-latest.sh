#!/usr/bin/env bash
# Early warning, never a gate: installs the NEWEST versions pyproject.toml's ranges allow (no lock)
# into a throwaway venv, lists where they differ from requirements.lock, and runs the fast tests.
# It exits non-zero when something breaks, so a scheduled job can report it; `make test` and CI
# install from the lock and are not affected.   make check-latest
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
pip="$work/venv/bin/pip"
"$pip" install --quiet --upgrade pip
# torch stays the CPU wheel of the lock's constraints (a newer torch in range is a CUDA build of GBs).
if ! "$pip" install --quiet --upgrade --upgrade-strategy eager -c requirements/constraints-lock.txt -e ".[test]"; then
    echo "check-latest: the newest versions in range do not install together" >&2
    exit 2
fi
echo "versions that differ from requirements.lock (lock -> newest):"
"$work/venv/bin/python" - <<'PY'
import re, importlib.metadata as md
locked = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^ \\]+)", open("requirements.lock").read(), re.M))
for name, version in sorted(locked.items()):
    try:
        now = md.version(name)
    except md.PackageNotFoundError:
        continue
    if now != version:
        print(f"  {name}: {version} -> {now}")
PY
"$work/venv/bin/pip" check || echo "check-latest: pip check found conflicts (above)"
# The lock-equality test is meant to fail when newer versions exist: that difference is listed above.
"$work/venv/bin/python" -m pytest -m "not slow" -q -p no:cacheprovider \
    --deselect tests/test_repository.py::test_the_installed_environment_is_the_lock
status=$?
[ $status -eq 0 ] && echo "check-latest: the newest versions pass the fast tests" \
                  || echo "check-latest: the newest versions FAIL the fast tests (exit $status); the lock still holds"
exit $status
