"""Every shipped recipe validates (what `lsm show` checks), so docs and commands stay runnable."""

from pathlib import Path

import pytest

from lsm_registry.plugins import build_registry
from lsm_registry.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
#: recipes/_base holds the files recipes extend: parts of recipes, not recipes on their own.
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.toml") if "_base" not in p.relative_to(ROOT / "recipes").parts)


@pytest.fixture(scope="module")
def registry():
    return build_registry(entry_points=False)


def test_the_paper_table_rows_have_recipes():
    names = {p.stem for p in (ROOT / "recipes").glob("*.toml")}
    expected = {
        "ce",
        "ce_drw",
        "ldam_drw",
        "focal",
        "balanced_softmax",
        "cutmix",
        "mixup",
        "remix",
        "cmo",
        "cmo_ldam_drw",
        "lsm_ce",
        "lsm_ce_drw",
        "lsm_ldam_drw",
        "quickstart",
    }
    assert expected <= names


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipe_validates(path, registry):
    recipe = load_recipe(path, registry=registry)
    assert recipe.run.epochs >= 1
    if recipe.mixer is not None:
        assert recipe.label_fuser is not None


@pytest.mark.parametrize("factor", [50, 10])
def test_other_imbalance_factors_by_override(factor, registry):
    recipe = load_recipe(ROOT / "recipes" / "lsm_ce.toml", [f"data.imbalance_factor={factor}"], registry)
    assert recipe.data.params.imbalance_factor == factor


def test_every_paper_table_row_names_a_recipe_that_validates(registry):
    """docs/paper-table.md: each table row names at least one recipe file, and every recipe it names validates."""
    import re

    text = (ROOT / "docs" / "paper-table.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| row", "|---"))]
    paper_rows = [r for r in rows if re.match(r"\| [^|]+ \| [0-9]", r)]
    assert len(paper_rows) >= 46
    unnamed = [r.split("|")[1].strip() for r in paper_rows if not re.search(r"recipes/[\w/]+\.toml|`[\w/]+\.toml`", r)]
    assert not unnamed, f"rows without a recipe: {unnamed}"
    named = set(re.findall(r"recipes/([\w/]+\.toml)", text))
    for name in sorted(named):
        load_recipe(ROOT / "recipes" / name, registry=registry)
