"""Renamed components and parameters: old names resolve with one warning, are never listed,
and can never shadow a live name (lsm_registry.renames, Registry)."""

from __future__ import annotations

import types
import warnings

import attrs
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_RECIPE, table_rows

from lsm_registry import Callback, Loss, RenamedWarning, hookimpl, param, plugins
from lsm_registry.errors import RecipeError, RegistryError
from lsm_registry.plugins import build_registry
from lsm_registry.recipe import load_recipe, migrate
from lsm_registry.registry import Owner, Registry

OWNER = Owner("renamer", "renamer-dist", "2.0")


class SoftCE(Loss):
    """Cross-entropy under its new name (a test plugin's renamed loss)."""

    name = "soft-ce"
    renamed_from = ("old-ce",)
    renamed_params = {"smooth": "smoothing"}

    @attrs.frozen
    class Params:
        smoothing: float = param(0.0, help="label smoothing")

    def __call__(self, logits, target, mixed=None):
        return torch.nn.functional.cross_entropy(logits, target, label_smoothing=self.params.smoothing)


class Counter(Callback):
    """Counts epochs (a test plugin's renamed callback)."""

    name = "epoch-counter"
    renamed_from = ("counter",)
    renamed_params = {"every": "period"}

    @attrs.frozen
    class Params:
        period: int = param(1, help="count every N epochs")


def plugin(*classes) -> types.SimpleNamespace:
    @hookimpl
    def lsm_registry_components():
        return list(classes)

    return types.SimpleNamespace(lsm_registry_components=lsm_registry_components)


@pytest.fixture(scope="module")
def registry() -> Registry:
    reg = build_registry(extra=[("renamer", plugin(SoftCE, Counter), OWNER)], entry_points=False)
    assert not reg.problems
    return reg


def renamed_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RenamedWarning)]


def load(write_recipe, registry, text: str, overrides=()):
    path = write_recipe(TINY_RECIPE.replace('[loss]\nname = "ce"\n', text))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        recipe = load_recipe(path, list(overrides), registry)
    return path, recipe, renamed_warnings(record)


# ------------------------------------------------------------------ recipes


def test_an_old_component_name_resolves_with_one_warning(write_recipe, registry):
    path, recipe, messages = load(write_recipe, registry, '[loss]\nname = "old-ce"\n')
    assert recipe.loss.name == "soft-ce" and isinstance(recipe.loss.params, SoftCE.Params)
    assert len(messages) == 1
    assert messages[0].startswith(f"{path} [loss].name: loss 'old-ce' was renamed 'soft-ce' (renamer-dist 2.0)")
    assert issubclass(RenamedWarning, FutureWarning)  # shown by default to people who run lsm


def test_an_old_parameter_name_resolves_with_one_warning(write_recipe, registry):
    path, recipe, messages = load(write_recipe, registry, '[loss]\nname = "soft-ce"\nsmooth = 0.1\n')
    assert recipe.loss.params.smoothing == 0.1
    assert messages == [
        f"{path} [loss].smooth: parameter 'smooth' of loss 'soft-ce' was renamed 'smoothing' "
        "(renamer-dist 2.0); write smoothing instead, the old name stops working in a later release"
    ]


def test_old_names_from_the_command_line_resolve_too(write_recipe, registry):
    _, recipe, messages = load(write_recipe, registry, "", ["loss.name=old-ce", "loss.smooth=0.2"])
    assert (recipe.loss.name, recipe.loss.params.smoothing) == ("soft-ce", 0.2)
    assert len(messages) == 2 and "[loss].name" in messages[0] and "[loss].smooth" in messages[1]


def test_the_resolved_recipe_has_only_the_new_names(write_recipe, registry):
    _, recipe, _ = load(write_recipe, registry, '[loss]\nname = "old-ce"\nsmooth = 0.1\n')
    text = recipe.to_toml()
    assert 'name = "soft-ce"' in text and "smoothing = 0.1" in text
    assert "old-ce" not in text and "smooth =" not in text


def test_the_run_folder_keeps_the_new_names(write_recipe, registry, tmp_path):
    from lsm_registry import train

    path = write_recipe(TINY_RECIPE.replace('[loss]\nname = "ce"\n', '[loss]\nname = "old-ce"\nsmooth = 0.1\n'))
    with pytest.warns(RenamedWarning):
        run = train(path, out=tmp_path / "run", registry=registry)
    stored = (run.run_dir / "recipe.toml").read_text()
    assert 'name = "soft-ce"' in stored and "smoothing = 0.1" in stored and "old-ce" not in stored


def test_old_names_of_listed_callbacks_resolve_with_their_tables(write_recipe, registry):
    text = '[loss]\nname = "ce"\n\n[callbacks.counter]\nevery = 2\n'
    _, recipe, messages = load(write_recipe, registry, text, ['run.callbacks=["counter"]'])
    assert recipe.run.callbacks == ("epoch-counter",)
    assert [(spec.name, spec.params.period) for spec in recipe.callbacks] == [("epoch-counter", 2)]
    assert len(messages) == 2 and "[run].callbacks: callback 'counter'" in messages[0]
    assert "[callbacks.epoch-counter].every" in messages[1]


def test_old_and_new_parameter_together_is_one_error(write_recipe, registry):
    path = write_recipe(
        TINY_RECIPE.replace('[loss]\nname = "ce"\n', '[loss]\nname = "soft-ce"\nsmooth = 0.1\nsmoothing = 0.2\n')
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry=registry)
    assert info.value.lines == [f"{path} [loss].smooth: renamed 'smoothing', which the table sets too; remove smooth"]


def test_a_stored_recipe_with_old_names_migrates_silently(registry):
    stored = {"data": {"name": "synthetic-lt"}, "loss": {"name": "old-ce", "smooth": 0.1}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        migrated = migrate(stored, registry)
    assert migrated["loss"] == {"name": "soft-ce", "smoothing": 0.1}


def test_a_lookup_by_the_old_name_warns_and_finds_the_new_class(registry):
    with pytest.warns(RenamedWarning, match="loss 'old-ce' was renamed 'soft-ce'"):
        assert registry.get("loss", "old-ce") is SoftCE
    assert registry.resolve("loss", "old-ce")[0] == "soft-ce"
    assert registry.resolve("loss", "ce") == ("ce", None)


# ------------------------------------------------------------------ listings


def test_listings_hide_the_old_names(registry):
    assert "old-ce" not in registry.names("loss") and ("loss", "old-ce") not in registry
    assert [e.name for e in registry.list(pattern="old-ce")] == []
    olds = {(r.kind, r.old, r.new, r.param) for r in registry.renames()}
    assert olds == {
        ("loss", "old-ce", "soft-ce", None),
        ("loss", "soft-ce", "soft-ce", ("smooth", "smoothing")),
        ("callback", "counter", "epoch-counter", None),
        ("callback", "epoch-counter", "epoch-counter", ("every", "period")),
    }


def test_list_components_hides_old_names_and_lists_them_with_deprecated(registry, monkeypatch):
    from lsm_registry.cli import cli

    monkeypatch.setattr(plugins, "_default", registry)
    runner = CliRunner()
    listed = runner.invoke(cli, ["list-components", "--kind", "loss"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    names = [row[1] for row in table_rows(listed.output)]
    assert "soft-ce" in names and "old-ce" not in names and "deprecated" not in listed.output
    old = runner.invoke(cli, ["list-components", "--deprecated", "--kind", "loss"], env={"COLUMNS": "200"})
    assert old.exit_code == 0, old.output
    assert table_rows(old.output) == [
        ["loss", "old-ce", "soft-ce", "renamer-dist 2.0"],
        ["loss", "soft-ce.smooth", "soft-ce.smoothing", "renamer-dist 2.0"],
    ]


def test_lsm_show_prints_one_warning_line_per_old_name(write_recipe, registry, monkeypatch):
    from lsm_registry.cli import cli

    monkeypatch.setattr(plugins, "_default", registry)
    path = write_recipe(TINY_RECIPE.replace('[loss]\nname = "ce"\n', '[loss]\nname = "old-ce"\n'))
    result = CliRunner().invoke(cli, ["show", str(path)])
    assert result.exit_code == 0, result.output
    assert 'name = "soft-ce"' in result.stdout and "old-ce" not in result.stdout
    assert result.stderr.splitlines() == [
        f"warning: {path} [loss].name: loss 'old-ce' was renamed 'soft-ce' "
        "(renamer-dist 2.0); write 'soft-ce' instead, the old name stops working "
        "in a later release"
    ]


# ------------------------------------------------------------------ clashes are refused at registration


def _loss(name: str, **attributes) -> type:
    def call(self, logits, target, mixed=None):
        return logits.sum()

    body = {
        "__doc__": "A test loss.",
        "name": name,
        "__call__": call,
        "Params": attrs.frozen(type("Params", (), {"__annotations__": {"k": "float"}, "k": param(1.0, help="k")})),
        **attributes,
    }
    return type(f"Loss_{name.replace('-', '_')}", (Loss,), body)


def test_an_old_name_equal_to_a_live_name_is_refused_in_one_line():
    registry = build_registry(entry_points=False)
    with pytest.raises(RegistryError) as info:
        registry.register(_loss("my-ce", renamed_from=("ce",)), OWNER)
    message = str(info.value)
    assert "renamed_from 'ce' is a live loss, provided by lsm-registry" in message and "\n" not in message
    assert registry.resolve("loss", "ce") == ("ce", None) and "my-ce" not in registry.names("loss")


def test_a_live_name_equal_to_an_old_name_is_refused_in_one_line(registry):
    staged = registry.copy()
    with pytest.raises(RegistryError) as info:
        staged.register(_loss("old-ce"), Owner("late", "late-dist", "1.0"))
    assert "loss 'old-ce' is the old name of loss 'soft-ce' (renamer-dist 2.0)" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_plugin_whose_old_name_clashes_is_skipped_with_one_problem():
    registry = build_registry(
        extra=[("clash", plugin(_loss("my-ce", renamed_from=("ce",))), OWNER)], entry_points=False
    )
    assert len(registry.problems) == 1 and "renamed_from 'ce' is a live loss" in registry.problems[0]
    assert "my-ce" not in registry.names("loss") and registry.renames() == []


@pytest.mark.parametrize(
    "attributes, problem",
    [
        ({"renamed_params": {"k": "k"}}, "renamed_params maps 'k', which is a live parameter"),
        ({"renamed_params": {"old": "nope"}}, "renamed_params maps 'old' to 'nope', which is not a parameter"),
        ({"renamed_from": "old"}, "renamed_from must be a tuple of old names"),
        ({"renamed_from": ("my-loss",)}, "renamed_from holds its own name 'my-loss'"),
    ],
)
def test_a_bad_declaration_is_refused_in_one_line(attributes, problem):
    with pytest.raises(RegistryError, match=problem):
        Registry().register(_loss("my-loss", **attributes), OWNER)


def test_old_names_are_not_inherited(registry):
    class Smoother(SoftCE):
        """A subclass is another component, with names of its own."""

        name = "smoother"

    staged = registry.copy()
    staged.register(Smoother, OWNER)
    assert staged.resolve("loss", "old-ce")[0] == "soft-ce" and staged.param_renames("loss", "smoother") == {}


def test_check_component_accepts_a_renamed_component():
    from lsm_registry.testing import check_component

    check_component(SoftCE)
