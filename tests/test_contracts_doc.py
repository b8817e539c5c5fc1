"""docs/contracts.md stays the reference of lsm_registry/interfaces.py: one section per kind of
the registry, naming only methods and class attributes its base class has, and every abstract one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lsm_registry import interfaces
from lsm_registry.interfaces import KINDS, Component

DOC = Path(__file__).resolve().parents[1] / "docs" / "contracts.md"
#: A kind's section: "## `mixer`: `Mixer`", up to the next "## " heading.
SECTION = re.compile(r"^## `(\w+)`: `(\w+)`\n(.*?)(?=^## |\Z)", re.M | re.S)
#: The first cell of a table row, and the `name` or `name(...)` spans in it.
FIRST_CELL = re.compile(r"^\| ([^|]*) \|", re.M)
NAMED = re.compile(r"`(\w+)(?:\([^`]*\))?`")


def base_classes() -> dict[str, type]:
    """kind -> the base class of interfaces.py that declares it."""
    found: dict[str, type] = {}
    for value in vars(interfaces).values():
        if (
            isinstance(value, type)
            and issubclass(value, Component)
            and value is not Component
            and "kind" in vars(value)
        ):
            assert value.kind not in found, f"two base classes declare kind {value.kind!r}"
            found[value.kind] = value
    return found


def sections() -> dict[str, tuple[str, str]]:
    return {kind: (base, body) for kind, base, body in SECTION.findall(DOC.read_text(encoding="utf-8"))}


def tables(body: str, first_header: str) -> list[str]:
    """The names in the first column of every table of ``body`` whose header starts with ``first_header``."""
    names: list[str] = []
    for table in re.findall(rf"^\| {first_header} \|.*?(?=^[^|]|\Z)", body, re.M | re.S):
        rows = [row for row in FIRST_CELL.findall(table)[1:] if not set(row) <= set("-: ")]
        names += [name for row in rows for name in NAMED.findall(row)]
    return names


def test_the_base_classes_cover_the_kinds():
    assert set(base_classes()) == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_a_section_naming_its_base_class(kind):
    found = sections()
    assert kind in found, f"docs/contracts.md has no section '## `{kind}`: `{base_classes()[kind].__name__}`'"
    assert found[kind][0] == base_classes()[kind].__name__, f"docs/contracts.md names the wrong base class for {kind!r}"


@pytest.mark.parametrize("kind", KINDS)
def test_a_section_names_only_what_its_base_class_has(kind):
    base = base_classes()[kind]
    _, body = sections()[kind]
    methods = tables(body, "method")
    assert methods, f"docs/contracts.md, {kind}: no method table"
    missing = [name for name in methods + tables(body, "attribute") if not hasattr(base, name)]
    assert not missing, f"docs/contracts.md, {kind}: {base.__name__} has no {', '.join(missing)}"
    undocumented = sorted(set(getattr(base, "__abstractmethods__", ())) - set(methods))
    assert not undocumented, (
        f"docs/contracts.md, {kind}: abstract {', '.join(undocumented)} of {base.__name__} not in a method table"
    )


def test_the_section_parser_sees_a_wrong_name():
    body = "| method | takes |\n|---|---|\n| `mix(x_f, x_b)`, `blend(x)` | x |\n\nprose\n"
    assert tables(body, "method") == ["mix", "blend"]
    assert not hasattr(interfaces.Mixer, "blend")
