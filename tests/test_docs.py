"""Docs stay true to the code: every recipe key of [run] and [optim] is documented."""

from pathlib import Path

import attrs

from lsm_registry.recipe import FIXED_TABLES

ROOT = Path(__file__).resolve().parents[1]


def test_every_fixed_table_key_is_in_docs_recipes_md():
    text = (ROOT / "docs" / "recipes.md").read_text()
    for table, cls in FIXED_TABLES.items():
        assert f"## [{table}]" in text
        for field in attrs.fields(cls):
            assert f"`{field.name}`" in text, f"[{table}].{field.name} is not documented in docs/recipes.md"


def test_readme_commands_exist():
    from click.testing import CliRunner

    from lsm_registry.cli import cli

    readme = (ROOT / "README.md").read_text()
    for command in ("run", "show", "list-components"):
        assert f"lsm {command}" in readme
        assert CliRunner().invoke(cli, [command, "--help"]).exit_code == 0
