"""Callbacks: the loop's fixed points, fired in the documented order, with state that survives a resume."""

from __future__ import annotations

import warnings
from typing import Any

import attrs
import pytest
from click.testing import CliRunner

from lsm_registry.cli import cli
from lsm_registry.components.cached_saliency import CachedGradCAM
from lsm_registry.engine import Trainer
from lsm_registry.errors import RecipeError
from lsm_registry.interfaces import Callback
from lsm_registry.params import param
from lsm_registry.plugins import build_registry
from lsm_registry.recipe import load_recipe
from lsm_registry.registry import Owner
from lsm_registry.testing import check_component


class Recorder(Callback):
    """Records the hooks it sees and counts the steps (its state)."""

    name = "t-recorder"

    @attrs.frozen
    class Params:
        tag: str = param("x", help="a label, to see that [callbacks.NAME] reaches the callback")

    def __init__(self, params: Any, context: Any):
        super().__init__(params, context)
        self.calls: list[str] = []
        self.steps = 0

    def on_fit_start(self, loop):
        self.calls.append("fit_start")

    def on_epoch_start(self, loop, epoch):
        # The engine's lr-schedule ran before this one.
        self.calls.append(f"epoch_start {epoch} lr={loop.optimizer.param_groups[0]['lr']:.4f}")

    def on_batch(self, loop, batch):
        self.calls.append("batch")

    def on_forward(self, loop, batch, logits, features):
        self.calls.append("forward")

    def on_step_end(self, loop, batch, loss):
        self.steps += 1
        self.calls.append(f"step_end {batch.step}")

    def on_check(self, loop, epoch):
        self.calls.append("check")

    def on_epoch_end(self, loop, epoch, record):
        record["t_steps"] = self.steps
        self.calls.append("epoch_end")

    def on_evaluate(self, loop, epoch, record):
        self.calls.append(f"evaluate {record['top1'] is not None}")

    def on_fit_end(self, loop, summary):
        self.calls.append("fit_end")

    def state_dict(self):
        return {"steps": self.steps, "tag": self.params.tag}

    def load_state_dict(self, state):
        self.steps = state["steps"]


@pytest.fixture
def registry_with_recorder():
    registry = build_registry(entry_points=False)
    registry.register(Recorder, Owner("t", "t-dist", "0"))
    return registry


def recorder(trainer: Trainer) -> Recorder:
    return next(c for c in trainer.callbacks if isinstance(c, Recorder))


def test_list_components_shows_the_built_in_callbacks():
    result = CliRunner().invoke(cli, ["list-components", "--kind", "callback"])
    assert result.exit_code == 0, result.output
    for name in ("lr-schedule", "nan-guard", "saliency-observer"):
        assert name in result.output


def test_hooks_fire_in_the_documented_order(tiny_recipe, registry_with_recorder):
    recipe = load_recipe(
        tiny_recipe,
        ["run.callbacks=['t-recorder']", "callbacks.t-recorder.tag='y'", "run.epochs=2", "run.eval_every=2"],
        registry_with_recorder,
    )
    trainer = Trainer(recipe, registry_with_recorder)
    names = [c.name for c in trainer.callbacks]
    assert names[:2] == ["lr-schedule", "nan-guard"] and names[-1] == "t-recorder"
    summary = trainer.fit()
    calls = recorder(trainer).calls
    steps = trainer.sampler.steps_per_epoch(recipe.optim.batch_size)
    one_step = ["batch", "forward"]
    assert calls[0] == "fit_start" and calls[-1] == "fit_end"
    assert calls[1] == f"epoch_start 0 lr={recipe.optim.lr:.4f}"
    first_epoch = calls[2 : 2 + steps * 3]
    assert first_epoch == [x for s in range(1, steps + 1) for x in (*one_step, f"step_end {s}")]
    assert calls[2 + steps * 3 : 2 + steps * 3 + 3] == [
        "check",
        "check",
        "epoch_end",
    ]  # at the last step's log and the epoch's end
    assert calls.count("evaluate True") == 1 and calls.index("evaluate True") > calls.index("epoch_start 1 lr=0.0500")
    assert [r["t_steps"] for r in trainer.history] == [steps, 2 * steps]
    assert recorder(trainer).params.tag == "y" and summary["epochs"] == 2


def test_a_callbacks_state_is_checkpointed_and_restored_on_resume(tiny_recipe, registry_with_recorder, tmp_path):
    args = ["run.callbacks=['t-recorder']"]
    folder = tmp_path / "run"
    trainer = Trainer(load_recipe(tiny_recipe, args, registry_with_recorder), registry_with_recorder, run_dir=folder)
    trainer.fit()
    steps = recorder(trainer).steps
    resumed = Trainer(
        load_recipe(tiny_recipe, [*args, "run.epochs=2"], registry_with_recorder),
        registry_with_recorder,
        run_dir=folder,
        resume=True,
    )
    resumed.fit()
    assert steps > 0 and recorder(resumed).steps == 2 * steps


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["run.callbacks=['nan-guard']"], "'nan-guard' is always on"),
        (["run.callbacks=['t-recordr']"], "Did you mean 't-recorder'"),
        (["callbacks.t-recorder.tag='y'"], "is not in [run].callbacks"),
        (["run.callbacks=['t-recorder']", "callbacks.t-recorder.tga='y'"], "tga"),
    ],
)
def test_bad_callback_settings_are_refused_at_validation(tiny_recipe, registry_with_recorder, overrides, words):
    with pytest.raises(RecipeError) as info:
        load_recipe(tiny_recipe, overrides, registry_with_recorder)
    assert words in str(info.value)


def test_the_engine_callbacks_and_the_observer_pass_the_conformance_kit():
    for cls in (Recorder,):
        check_component(cls, build_registry(entry_points=False))
    registry = build_registry(entry_points=False)
    for name in ("lr-schedule", "nan-guard", "saliency-observer"):
        check_component(registry.get("callback", name))


class LegacyCached(CachedGradCAM):
    """cached-gradcam in the deprecated form: observes_training and no callback of its own."""

    name = "t-legacy-cached"
    observes_training = True

    def configure_callbacks(self):
        return []


def test_a_provider_of_the_deprecated_observing_form_still_observes_and_warns(tiny_recipe):
    registry = build_registry(entry_points=False)
    registry.register(LegacyCached, Owner("t", "t-dist", "0"))
    recipe = load_recipe(
        tiny_recipe,
        [
            "saliency.name='t-legacy-cached'",
            "mixer.name='lsm'",
            "mixer.start_epoch=1",
            "mixer.end_epoch=2",
            "run.epochs=2",
        ],
        registry,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(recipe, registry)
    assert any(issubclass(w.category, DeprecationWarning) and "configure_callbacks" in str(w.message) for w in caught)
    assert trainer.observing
    trainer.fit()
    assert int((trainer.saliency.stamps >= 0).sum()) > 0  # epoch 0's unmixed forwards were observed
    assert "saliency_fresh_fraction" in trainer.history[-1]
