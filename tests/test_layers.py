"""Layers only point down: the import-linter contract in pyproject.toml, on the installed layout.

The source tree maps registry/, serve/ and training/ to lorafleet.registry... (pyproject's
package-dir), which an editable install resolves through an import hook that import-linter's
graph builder does not follow; the test lays the package out as a wheel would, then lints it.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _installed_layout(target: Path) -> Path:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, directory in sorted(mapping.items(), key=lambda item: item[0].count(".")):
        shutil.copytree(ROOT / directory, target / package.replace(".", "/"), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def _lint(layout: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(ROOT / "pyproject.toml")], cwd=layout,
                          env={"PYTHONPATH": str(layout), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def test_every_layer_imports_only_from_the_layers_below_it(tmp_path):
    result = _lint(_installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The check can fail: the registry importing the serving layer (even inside a function)."""
    layout = _installed_layout(tmp_path)
    (layout / "lorafleet" / "registry" / "upward.py").write_text(
        "def f():\n    from lorafleet.serve import engine\n    return engine\n")
    result = _lint(layout)
    assert result.returncode != 0
    assert "lorafleet.registry.upward -> lorafleet.serve.engine" in result.stdout


PRODUCT_DIRECTORIES = ("lorafleet", "registry", "serve", "training")
DECLARATION = "# Imports inside functions:"
HEAVY = ("torch", "diffusers", "transformers", "peft", "ray", "boto3")


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    found += [(inner.lineno, alias.name) for alias in inner.names]
                elif isinstance(inner, ast.ImportFrom):
                    found.append((inner.lineno, "." * inner.level + (inner.module or "")))
    return found


def test_imports_inside_functions_buy_start_up_time_and_say_so():
    """A standard-library import inside a function buys nothing; any other says why in its module."""
    problems = []
    for directory in PRODUCT_DIRECTORIES:
        for path in sorted((ROOT / directory).rglob("*.py")):
            imports = _function_level_imports(path)
            name = path.relative_to(ROOT)
            problems += [f"{name}:{line}: {module} is standard library: import it at the top"
                         for line, module in imports if module.split(".")[0] in sys.stdlib_module_names]
            if imports and DECLARATION not in path.read_text():
                problems.append(f"{name}: imports inside functions without a '{DECLARATION} <why>' line")
    assert not problems, "\n".join(problems)


def test_the_command_line_starts_without_torch_ray_or_diffusers():
    """What the imports inside functions buy: `lorafleet --help` and registry look-ups stay light."""
    probe = ("import sys, tempfile\n"
             "from lorafleet.cli import build_parser\n"
             "build_parser()\n"
             "from lorafleet.registry import AdapterRegistry\n"
             "registry = AdapterRegistry('file://' + tempfile.mkdtemp())\n"
             "registry.listing()\n"
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]", result.stdout
