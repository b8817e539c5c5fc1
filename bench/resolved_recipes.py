"""Snapshot of every shipped recipe as it resolves: tests/data/resolved_recipes.json.

Why: recipes share bases (``extends``), so editing one base changes many recipes at
once. tests/test_recipe_extends.py resolves every shipped recipe again and compares it
with this snapshot, so a refactor of recipes onto bases has to leave each recipe's
settings exactly as they were. Regenerate the snapshot (and review its diff) only when a
recipe's settings are meant to change:

    python -m bench.resolved_recipes
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SNAPSHOT = ROOT / "tests" / "data" / "resolved_recipes.json"
#: Folders under recipes/ that hold shared bases, not recipes of their own.
BASE_DIRS = ("_base",)
#: ``--set`` lines a recipe needs before it validates (none of the shipped ones does today).
OVERRIDES: dict[str, list[str]] = {}
#: Keys of the file, not of the setting: left out of the snapshot.
LEFT_OUT = ("format", "extends")


def shipped_recipes() -> list[Path]:
    """Every recipe under recipes/, its shared bases left out."""
    return sorted(p for p in RECIPES.rglob("*.toml") if not set(p.relative_to(RECIPES).parts[:-1]) & set(BASE_DIRS))


def resolve(path: Path, registry: Any) -> dict[str, Any]:
    """A recipe's resolved settings as JSON would give them back (tuples as lists)."""
    from lsm_registry.recipe import load_recipe

    key = path.relative_to(RECIPES).as_posix()
    settings = load_recipe(path, OVERRIDES.get(key, []), registry).to_dict()
    return json.loads(json.dumps({table: keys for table, keys in settings.items() if table not in LEFT_OUT}))


def resolve_all() -> dict[str, dict[str, Any]]:
    from lsm_registry.plugins import default_registry

    registry = default_registry()
    return {path.relative_to(RECIPES).as_posix(): resolve(path, registry) for path in shipped_recipes()}


def main() -> int:
    resolved = resolve_all()
    SNAPSHOT.write_text(json.dumps(resolved, indent=1) + "\n", encoding="utf-8")
    print(f"{SNAPSHOT.relative_to(ROOT)}: {len(resolved)} recipes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
