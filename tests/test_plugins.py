"""Plugin loading: failure isolation, LSM_DISABLE_PLUGINS, entry-point discovery, docs."""

from __future__ import annotations

import importlib.metadata as md
import inspect
import re
import sys
import types
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner
from conftest import table_rows

from lsm_registry import Component, Loss, Mixer, MixerParams, MixResult, __version__, hookimpl, hookspecs, plugins
from lsm_registry.params import param, positive
from lsm_registry.plugins import build_registry, hook_names
from lsm_registry.registry import Owner

ROOT = Path(__file__).resolve().parents[1]


def owner(name: str = "thirdparty") -> Owner:
    return Owner(name, f"{name}-dist", "9.9")


def plugin(*classes, raises: Exception | None = None, returns=None) -> types.SimpleNamespace:
    """A throwaway plugin object whose hook returns ``classes`` (or raises / returns ``returns``)."""

    @hookimpl
    def lsm_registry_components():
        if raises is not None:
            raise raises
        return returns if returns is not None else list(classes)

    return types.SimpleNamespace(lsm_registry_components=lsm_registry_components)


def load(*plugin_objects, env=None):
    """Registry with the built-ins plus the given (name, object) plugins, no entry points."""
    extra = [(name, obj, owner(name)) for name, obj in plugin_objects]
    return build_registry(extra=extra, entry_points=False, env=env or {})


class GoodLoss(Loss):
    """A loss from a third party."""

    name = "good-loss"

    @attrs.frozen
    class Params:
        scale: float = param(1.0, help="scale", validator=positive)

    def __call__(self, logits, target, mixed=None):
        return logits.sum() * 0


class GoodMixer(Mixer):
    """A mixer from a third party."""

    name = "good-mixer"

    @attrs.frozen
    class Params(MixerParams):
        pass

    def mix(self, x_f, x_b, saliency_f, patch):
        return MixResult(images=x_b, weight=x_b[:, :1] * 0)


def only_problem(registry, plugin_name: str) -> str:
    mine = [p for p in registry.problems if f"plugin {plugin_name!r}" in p]
    assert len(mine) == 1, registry.problems
    problem = mine[0]
    assert "\n" not in problem
    assert f"{plugin_name}-dist 9.9" in problem  # the distribution and its version
    assert f"LSM_DISABLE_PLUGINS={plugin_name}" in problem
    return problem


# ------------------------------------------------------------------ failure modes, in-process


def test_a_good_plugin_loads_next_to_the_builtins():
    registry = load(("good", plugin(GoodLoss, GoodMixer)))
    assert registry.problems == []
    assert registry.get("loss", "good-loss") is GoodLoss
    assert registry.entry("mixer", "good-mixer").owner == owner("good")
    assert "ce" in registry.names("loss")


def test_hook_that_raises_is_reported_and_skipped():
    registry = load(("boom", plugin(raises=RuntimeError("cannot find CUDA kernels"))), ("good", plugin(GoodLoss)))
    problem = only_problem(registry, "boom")
    assert "lsm_registry_components raised RuntimeError: cannot find CUDA kernels" in problem
    assert "good-loss" in registry.names("loss")


@pytest.mark.parametrize(
    "returned, expected",
    [
        (["not a class"], "returned 'not a class' (str), which is not a component class"),
        ([42], "returned 42 (int), which is not a component class"),
        ([int], "class builtins.int is not a component class"),
        ([GoodLoss(GoodLoss.Params(), None)], "returned an instance of GoodLoss; return the class itself"),
    ],
    ids=["string", "number", "non-component-class", "instance"],
)
def test_returning_something_that_is_not_a_component_class(returned, expected):
    registry = load(("odd", plugin(returns=returned)))
    assert expected in only_problem(registry, "odd")


def test_hook_returning_none_is_reported():
    @hookimpl
    def lsm_registry_components():
        return None

    registry = load(("none", types.SimpleNamespace(lsm_registry_components=lsm_registry_components)))
    assert "returned None; return a list of component classes" in only_problem(registry, "none")


def test_unknown_kind_names_the_class_and_suggests():
    class Mixr(Component):
        """Declares a kind with a typo."""

        kind = "mixr"
        name = "typo"

    registry = load(("kinds", plugin(Mixr)))
    problem = only_problem(registry, "kinds")
    assert f"class {__name__}.test_unknown_kind_names_the_class_and_suggests.<locals>.Mixr" in problem
    assert "declares kind 'mixr', which does not exist. Did you mean 'mixer'?" in problem


def test_collision_with_a_builtin_names_both_owners_and_classes():
    class MyCE(GoodLoss):
        """Another 'ce'."""

        name = "ce"

    registry = load(("clash", plugin(MyCE)))
    problem = only_problem(registry, "clash")
    assert "duplicate loss 'ce', already provided by lsm-registry" in problem
    assert "plugin 'builtin'" in problem and "MyCE" in problem
    assert registry.entry("loss", "ce").owner.distribution == "lsm-registry"


def test_collision_between_two_plugins_blames_the_second():
    registry = load(("first", plugin(GoodLoss)), ("second", plugin(GoodLoss, GoodMixer)))
    problem = only_problem(registry, "second")
    assert "duplicate loss 'good-loss', already provided by first-dist 9.9 (plugin 'first')" in problem
    assert registry.entry("loss", "good-loss").owner == owner("first")
    # All or nothing: the second plugin's other component is not registered either.
    assert "good-mixer" not in registry.names("mixer")
    assert "the plugin was skipped" in problem


def test_two_classes_of_one_plugin_with_the_same_name():
    other = type("OtherLoss", (GoodLoss,), {"__doc__": "Same name."})
    registry = load(("twice", plugin(GoodLoss, other)))
    assert "duplicate loss 'good-loss', also provided by" in only_problem(registry, "twice")
    # Listing the very same class twice is harmless.
    assert load(("same", plugin(GoodLoss, GoodLoss))).problems == []


def test_several_broken_classes_still_give_one_line():
    class NoName(GoodLoss):
        """No name."""

        name = ""

    class Abstract(Mixer):
        """Forgets mix()."""

        name = "abstract"

    registry = load(("many", plugin(NoName, Abstract, GoodMixer)))
    problem = only_problem(registry, "many")
    assert "has no name" in problem and "(and 1 more problem)" in problem
    assert "good-mixer" not in registry.names("mixer")


def test_abstract_class_and_bad_params_defaults():
    class Abstract(Mixer):
        """Forgets mix()."""

        name = "abstract"

    class BadDefault(GoodLoss):
        """Default fails its own validator."""

        name = "bad-default"

        @attrs.frozen
        class Params:
            scale: float = param(-1.0, help="scale", validator=positive)

    registry = load(("abstract", plugin(Abstract)), ("baddefault", plugin(BadDefault)))
    assert "is abstract: it does not implement mix" in only_problem(registry, "abstract")
    assert "Params() fails with its defaults: ParamError: must be > 0 (got -1.0)" in only_problem(
        registry, "baddefault"
    )


def test_misspelt_hook_is_reported_by_check_pending():
    @hookimpl
    def lsm_registry_component():  # missing the final "s"
        return [GoodLoss]

    registry = load(("typo", types.SimpleNamespace(lsm_registry_component=lsm_registry_component)))
    problem = only_problem(registry, "typo")
    assert "implements unknown hook 'lsm_registry_component' (did you mean 'lsm_registry_components'?)" in problem
    assert "good-loss" not in registry.names("loss")


def test_check_pending_is_what_catches_it():
    @hookimpl
    def lsm_registry_component():
        return []

    pm = plugins.make_plugin_manager()
    pm.register(types.SimpleNamespace(lsm_registry_component=lsm_registry_component), name="typo")
    with pytest.raises(Exception, match="unknown hook"):
        pm.check_pending()


def test_unmarked_hook_and_no_hook():
    def lsm_registry_components():  # forgot @hookimpl
        return [GoodLoss]

    registry = load(
        ("unmarked", types.SimpleNamespace(lsm_registry_components=lsm_registry_components)),
        ("empty", types.SimpleNamespace()),
    )
    assert "lsm_registry_components is not marked with @lsm_registry.hookimpl" in only_problem(registry, "unmarked")
    assert "implements no hook" in only_problem(registry, "empty")


def test_hook_with_a_wrong_argument_is_reported():
    @hookimpl
    def lsm_registry_components(config):  # the spec takes no argument
        return [GoodLoss]

    registry = load(("args", types.SimpleNamespace(lsm_registry_components=lsm_registry_components)))
    assert "cannot register its hooks" in only_problem(registry, "args")


def test_disable_by_plugin_or_distribution_name():
    broken = ("boom", plugin(raises=RuntimeError("x")))
    assert load(broken).problems
    assert load(broken, env={"LSM_DISABLE_PLUGINS": "boom"}).problems == []
    assert load(broken, env={"LSM_DISABLE_PLUGINS": "other, boom-dist"}).problems == []


def test_unknown_name_names_the_blocked_plugins():
    from lsm_registry.errors import RegistryError

    good = ("good", plugin(GoodLoss))
    other = ("other", plugin(type("OtherLoss", (GoodLoss,), {"name": "other-loss"})))
    registry = load(good, other, env={"LSM_DISABLE_PLUGINS": "good-dist, other, not-installed"})
    assert registry.blocked == ["good-dist", "other (other-dist)"]  # a name that matches nothing is not mentioned
    with pytest.raises(RegistryError) as info:
        registry.get("loss", "good-loss")
    message = str(info.value)
    assert "\n" not in message and message.startswith("unknown loss 'good-loss'.")
    assert message.endswith(
        "(plugins blocked by LSM_DISABLE_PLUGINS: good-dist, other (other-dist); one of them may provide it)"
    )
    one = load(good, env={"LSM_DISABLE_PLUGINS": "good"})
    with pytest.raises(
        RegistryError, match=r"\(plugin blocked by LSM_DISABLE_PLUGINS: good \(good-dist\); it may provide it\)"
    ):
        one.get("loss", "good-loss")
    nothing_blocked = load(good, env={"LSM_DISABLE_PLUGINS": "not-installed"})
    assert nothing_blocked.blocked == []
    with pytest.raises(RegistryError) as info:
        nothing_blocked.get("loss", "no-such-loss")
    assert "LSM_DISABLE_PLUGINS" not in str(info.value)


def test_recipe_error_names_a_blocked_installed_plugin(broken_site):
    from lsm_registry.errors import RecipeError
    from lsm_registry.recipe import validate

    registry = build_registry(env={"LSM_DISABLE_PLUGINS": "broken-plug"})
    assert "broken-plug" in registry.blocked and not [p for p in registry.problems if "broken-plug" in p]
    with pytest.raises(RecipeError) as info:
        validate({"data": {"name": "synthetic-lt"}, "loss": {"name": "scipy-loss"}}, "r.toml", registry)
    assert any(
        "unknown loss 'scipy-loss'" in line and "LSM_DISABLE_PLUGINS: broken-plug;" in line for line in info.value.lines
    )


def test_a_module_plugin_is_named_by_its_module():
    @hookimpl
    def lsm_registry_components():
        raise ValueError("bad")

    module = types.ModuleType("acme_lsm.plugin")
    module.lsm_registry_components = lsm_registry_components
    registry = load(("acme", module))
    assert "entry point acme = acme_lsm.plugin" in only_problem(registry, "acme")


# ------------------------------------------------------------------ real entry points


def make_distribution(site: Path, dist: str, module: str, source: str, entry: str = "broken") -> None:
    """A minimal installed distribution: a module plus a .dist-info with one entry point."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[lsm_registry]\n{entry} = {module}\n")


@pytest.fixture
def broken_site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(
        site, "broken-plug", "broken_plug_mod", "raise ImportError('needs scipy, which is not installed')\n"
    )
    make_distribution(site, "exiting-plug", "exiting_plug_mod", "import sys\nsys.exit(3)\n", entry="exiting")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(plugins, "_default", None)
    for name in ("broken_plug_mod", "exiting_plug_mod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield site
    plugins._default = None


def test_installed_broken_entry_point_is_one_line(broken_site):
    registry = build_registry(env={})
    problems = [p for p in registry.problems if "broken-plug" in p]
    assert len(problems) == 1
    problem = problems[0]
    assert problem.startswith("plugin 'broken' (distribution broken-plug 0.3, entry point broken = broken_plug_mod)")
    assert "failed to import: ImportError: needs scipy, which is not installed" in problem
    assert "LSM_DISABLE_PLUGINS=broken" in problem
    assert any("exiting-plug" in p and "SystemExit: 3" in p for p in registry.problems)
    assert "ce" in registry.names("loss")  # the built-ins still load
    quiet = build_registry(env={"LSM_DISABLE_PLUGINS": "broken,exiting-plug"})
    assert not [p for p in quiet.problems if "plug" in p]


def test_cli_still_works_with_a_broken_plugin(broken_site, monkeypatch):
    monkeypatch.delenv("LSM_DISABLE_PLUGINS", raising=False)
    from lsm_registry.cli import cli

    runner = CliRunner()
    help_result = runner.invoke(cli, ["--help"])
    assert help_result.exit_code == 0 and "LSM_DISABLE_PLUGINS" in help_result.output
    result = runner.invoke(cli, ["list-components", "--kind", "loss"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    providers = {row[1]: row[2] for row in table_rows(result.output)}
    assert providers["ce"] == f"lsm-registry {__version__}"
    lines = [line for line in result.output.splitlines() if line.startswith("not loaded: ")]
    assert any("broken-plug 0.3" in line and "LSM_DISABLE_PLUGINS=broken" in line for line in lines)
    assert "did not load" in result.output

    monkeypatch.setenv("LSM_DISABLE_PLUGINS", "broken,exiting")
    plugins._default = None
    result = runner.invoke(cli, ["list-components", "--kind", "loss"])
    assert result.exit_code == 0 and "not loaded" not in result.output


def _spectral_installed() -> bool:
    try:
        md.distribution("lsm-spectral")
    except md.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(
    not _spectral_installed(), reason="lsm-spectral is not installed (pip install -e plugins/lsm-spectral)"
)
def test_entry_point_discovery_with_the_example_plugin(monkeypatch):
    registry = build_registry(env={})
    for kind, name in (("saliency", "spectral-residual"), ("mixer", "saliencymix")):
        entry = registry.entry(kind, name)
        assert (entry.owner.plugin, entry.owner.distribution) == ("spectral", "lsm-spectral")
        assert entry.owner.version == md.version("lsm-spectral")
    assert not [p for p in registry.problems if "lsm-spectral" in p]
    blocked = build_registry(env={"LSM_DISABLE_PLUGINS": "spectral"})
    assert "saliencymix" not in blocked.names("mixer")
    monkeypatch.setattr(plugins, "_default", None)
    from lsm_registry.cli import cli

    output = CliRunner().invoke(cli, ["list-components", "saliencymix"], env={"COLUMNS": "200"}).output
    assert "lsm-spectral" in output and md.version("lsm-spectral") in output
    plugins._default = None


# ------------------------------------------------------------------ the guide documents every hook


def test_every_hookspec_is_documented_with_its_signature():
    guide = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    names = hook_names()
    assert "lsm_registry_components" in names
    for name in names:
        spec = getattr(hookspecs, name)
        signature = f"def {name}{inspect.signature(spec, eval_str=True)}"
        signature = re.sub(r"<class '([\w.]+)'>", r"\1", signature)
        assert signature in guide, f"docs/plugins.md does not show `{signature}`"
