"""A fresh machine: every import is declared, and the Makefile builds its own environment."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Import names whose distribution is spelt differently.
DIST_OF = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(pyproject: Path) -> set[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    names = {_norm(re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0]) for r in reqs}
    return names | {_norm(project["name"])}


def _imports(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for py in folder.rglob("*.py"):
        tree = ast.parse(py.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], py)
    return found


def _local_modules() -> set[str]:
    return {p.stem for p in ROOT.rglob("*.py") if ".venv" not in p.parts} | {"lsm_registry", "lsm_spectral", "bench"}


PROJECTS = [(ROOT / "pyproject.toml", [ROOT / "lsm_registry", ROOT / "tests", ROOT / "bench"])] + [
    (p, [p.parent / "src", p.parent / "tests"]) for p in sorted((ROOT / "plugins").glob("*/pyproject.toml"))
]


@pytest.mark.parametrize("pyproject, folders", PROJECTS, ids=[str(p.relative_to(ROOT)) for p, _ in PROJECTS])
def test_every_import_is_declared(pyproject, folders):
    declared = _declared(pyproject) | _declared(ROOT / "pyproject.toml")  # a plugin depends on lsm-registry
    local, stdlib = _local_modules(), set(sys.stdlib_module_names)
    missing = []
    for folder in folders:
        for top, where in sorted(_imports(folder).items()):
            if top in stdlib or top in local or top == "__future__":
                continue
            if _norm(DIST_OF.get(top, top)) not in declared:
                missing.append(f"{top} (imported in {where.relative_to(ROOT)})")
    assert not missing, f"{pyproject.relative_to(ROOT)} does not declare: {', '.join(missing)}"


def test_make_stops_with_the_fix_when_venv_is_missing(tmp_path):
    """A Python whose venv module fails (Debian without python3-venv) gets the one-line fix."""
    fake = tmp_path / "python3"
    fake.write_text(
        "#!/bin/sh\necho 'The virtual environment was not created successfully because ensurepip is not available.' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "install", f"PYTHON={fake}", f"VENV={venv}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "apt-get install python3-venv" in result.stderr
    assert not venv.exists(), "a half-made environment is left behind"


def test_make_targets_use_the_project_environment():
    """`make run` / `make test` never call a bare python or pip that may be a PEP 668 system one."""
    dry = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "run", "test", "VENV=/nonexistent-venv"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MAKEFLAGS": ""},
    )
    assert dry.returncode == 0, dry.stderr
    commands = [line for line in dry.stdout.splitlines() if "lsm run" in line or "pytest" in line]
    assert commands and all(line.startswith("/nonexistent-venv/bin/") for line in commands), commands
