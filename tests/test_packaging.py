"""A non-editable install has every module: the package list in pyproject.toml and the
Dockerfile's COPY lines are kept by hand, so a new subpackage could go missing from both."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT_ALL = """
import importlib, pkgutil, sys
# The locust file monkey-patches with gevent when imported, which must come before anything imports
# ssl (as under locust itself; walking the packages imports them): import it first.
importlib.import_module("lorafleet.devtools.locustfile")
import lorafleet
site = sys.argv[1]
names = ["lorafleet"] + [m.name for m in pkgutil.walk_packages(lorafleet.__path__, "lorafleet.")]
outside = []
for name in names:
    module = importlib.import_module(name)
    if not str(getattr(module, "__file__", "")).startswith(site):
        outside.append(f"{name}: {module.__file__}")
print(len(names), "modules")
assert not outside, outside
"""


def _source_modules() -> set[str]:
    """Every module of the source tree, named as installed (registry/ -> lorafleet.registry...)."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found = set()
    for package, directory in mapping.items():
        for path in (ROOT / directory).rglob("*.py"):
            relative = path.relative_to(ROOT / directory).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            if package == "lorafleet" and parts and parts[0] in {"registry", "serve", "training"}:
                continue
            found.add(".".join([package, *parts]))
    return found


@pytest.mark.slow
def test_the_wheel_installs_and_imports_every_module(tmp_path):
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheel_dir), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = wheel_dir.glob("lorafleet-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-P", "-c", IMPORT_ALL, str(site)], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    installed = {str(p.relative_to(site).with_suffix("")).replace("/", ".").removesuffix(".__init__")
                 for p in (site / "lorafleet").rglob("*.py")}
    assert _source_modules() <= installed, sorted(_source_modules() - installed)
    assert (site / "lorafleet" / "bases" / "toy" / "model_index.json").is_file()  # package data


def test_the_dockerfile_copies_every_package_directory():
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = set(re.findall(r"^COPY (\S+) \./", (ROOT / "Dockerfile").read_text(), re.M))
    assert set(mapping.values()) <= copied, set(mapping.values()) - copied
