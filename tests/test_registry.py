import attrs
import pytest

from lsm_registry import Component, Loss, hookimpl
from lsm_registry.errors import RegistryError
from lsm_registry.plugins import build_registry, disabled_plugins
from lsm_registry.registry import Owner, Registry


class _Loss(Loss):
    """A test loss."""

    name = "ce"

    @attrs.frozen
    class Params:
        pass

    def __call__(self, logits, target, mixed=None):
        return logits.sum()


def test_builtins_registered_by_kind():
    registry = build_registry(entry_points=False)
    assert "ce" in registry.names("loss")
    assert {"instance", "dual-branch"} <= set(registry.names("sampler"))
    assert "resnet32" in registry.names("model")
    assert "synthetic-lt" in registry.names("dataset")
    entry = registry.entry("loss", "ce")
    assert entry.owner.distribution == "lsm-registry"


def test_wildcard_listing_filters_kind_and_pattern():
    registry = build_registry(entry_points=False)
    names = [e.name for e in registry.list("sampler", "*branch*")]
    assert names == ["dual-branch"]
    assert all(e.kind == "model" for e in registry.list("model"))
    assert registry.list(pattern="no-such-*") == []


def test_unknown_name_suggests_the_closest():
    registry = build_registry(entry_points=False)
    with pytest.raises(RegistryError) as info:
        registry.get("loss", "cee")
    message = str(info.value)
    assert "Did you mean 'ce'?" in message and "Available:" in message and "\n" not in message


def test_unknown_kind_is_named():
    registry = build_registry(entry_points=False)
    with pytest.raises(RegistryError, match="unknown kind 'mixr'. Did you mean 'mixer'"):
        registry.get("mixr", "lsm")


def test_duplicate_names_both_owners():
    registry = Registry()
    registry.register(_Loss, Owner("first", "dist-a", "1.0"))
    with pytest.raises(RegistryError) as info:
        registry.register(_Loss, Owner("second", "dist-b", "2.0"))
    assert "dist-a" in str(info.value) and "dist-b" in str(info.value)


def test_duplicate_from_a_plugin_is_reported_not_fatal():
    class Plugin:
        @hookimpl
        def lsm_registry_components(self):
            return [_Loss]

    registry = build_registry(extra=[("dupe", Plugin(), Owner("dupe", "dupe-dist", "0.1"))], entry_points=False)
    assert registry.entry("loss", "ce").owner.distribution == "lsm-registry"
    assert any("duplicate loss 'ce'" in p and "dupe-dist" in p for p in registry.problems)


def test_disable_plugins_env_blocks_by_name():
    class Plugin:
        @hookimpl
        def lsm_registry_components(self):
            return [type("Other", (_Loss,), {"name": "other"})]

    env = {"LSM_DISABLE_PLUGINS": "mine, else"}
    assert disabled_plugins(env) == {"mine", "else"}
    registry = build_registry(extra=[("mine", Plugin(), Owner("mine", "mine", "0"))], entry_points=False, env=env)
    assert "other" not in registry.names("loss")
    registry = build_registry(extra=[("mine", Plugin(), Owner("mine", "mine", "0"))], entry_points=False, env={})
    assert "other" in registry.names("loss")


def test_no_registration_by_import_side_effect():
    import lsm_registry.components.losses  # noqa: F401

    assert Registry().list() == []


def test_non_component_is_refused():
    with pytest.raises(RegistryError, match="not a component class"):
        Registry().register(int, Owner("x", "x", "0"))


def test_component_summary_is_first_docstring_line():
    assert _Loss.summary() == "A test loss."
    assert issubclass(_Loss, Component)


def test_listing_pattern_is_a_case_insensitive_substring_of_the_name():
    registry = build_registry(entry_points=False)
    assert [e.name for e in registry.list("sampler", "branch")] == ["dual-branch"]
    assert "balanced-softmax" in [e.name for e in registry.list(pattern="SOFTMAX")]
    assert registry.list(pattern="no-such-thing") == []


def test_listing_pattern_matches_a_distribution_or_plugin_by_name():
    class Plugin:
        @hookimpl
        def lsm_registry_components(self):
            return [type("Wave", (_Loss,), {"name": "wave"})]

    extra = [("acme", Plugin(), Owner("acme", "acme_LSM.tools", "1.0"))]
    registry = build_registry(extra=extra, entry_points=False)
    for pattern in ("acme-lsm-tools", "ACME_lsm_tools", "acme"):
        assert [e.name for e in registry.list(pattern=pattern)] == ["wave"], pattern
    builtins = registry.list(pattern="lsm-registry")
    assert builtins and "wave" not in {e.name for e in builtins}
    assert all(e.owner.distribution == "lsm-registry" for e in builtins)
    assert registry.list(pattern="lsm") == [registry.entry("mixer", "lsm")]  # no substring match on distributions


def test_listing_wildcard_matches_name_or_distribution():
    class Plugin:
        @hookimpl
        def lsm_registry_components(self):
            return [type("Wave", (_Loss,), {"name": "wave"})]

    registry = build_registry(extra=[("acme", Plugin(), Owner("acme", "acme-tools", "1.0"))], entry_points=False)
    assert [e.name for e in registry.list("sampler", "*BRANCH")] == ["dual-branch"]
    assert [e.name for e in registry.list(pattern="acme-*")] == ["wave"]
    assert [e.name for e in registry.list("loss", "[b]*")] == ["balanced-softmax"]
    assert registry.list(pattern="branch*") == []  # a wildcard is anchored, unlike a plain word
