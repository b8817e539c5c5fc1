"""Settings that would silently do nothing are refused, and optional keys can be unset."""

from __future__ import annotations

import tomllib

import pytest
from click.testing import CliRunner
from conftest import TINY_RECIPE

from lsm_registry import MixerParams
from lsm_registry.cli import cli
from lsm_registry.engine import Trainer
from lsm_registry.errors import LSMError, RecipeError
from lsm_registry.recipe import load_recipe

MIXING = TINY_RECIPE + '\n[sampler]\nname = "dual-branch"\n\n[mixer]\nname = "{mixer}"\n'


@pytest.mark.parametrize("mixer", ["lsm", "cmo"])
@pytest.mark.parametrize("epochs", [1, 3, 5, 7])
def test_an_empty_mixing_window_is_a_recipe_error(write_recipe, registry, mixer, epochs):
    path = write_recipe(MIXING.format(mixer=mixer))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, [f"run.epochs={epochs}"], registry)
    (line,) = info.value.lines
    assert line.startswith(
        f"{path} [mixer] start_epoch = 4 .. end_epoch = -3 is empty for run.epochs = {epochs}: "
        "no batch would be mixed; for a run this short add --set mixer.start_epoch="
    )
    recipe = load_recipe(path, ["run.epochs=8"], registry)  # 4 <= epoch < 5: one epoch mixes
    assert list(recipe.mixer.params.window(8)) == [4]


def test_a_mixer_that_never_mixes_by_probability_is_refused(write_recipe, registry):
    path = write_recipe(MIXING.format(mixer="cutmix"))
    with pytest.raises(RecipeError, match=r"\[mixer\].prob: 0 means no batch would be mixed"):
        load_recipe(path, ["mixer.prob=0.0"], registry)


def test_every_registered_mixer_shares_one_window(registry):
    names = registry.names("mixer")
    assert {"lsm", "cmo", "cutmix", "mixup"} <= set(names)
    for name in names:
        params_cls = registry.get("mixer", name).Params
        assert issubclass(params_cls, MixerParams), name
        window = params_cls(start_epoch=2, end_epoch=None).window(6)
        assert list(window) == [2, 3, 4, 5], name
        assert list(params_cls(start_epoch=1, end_epoch=-2).window(6)) == [1, 2, 3], name


def test_a_mixer_without_the_shared_knobs_cannot_be_defined():
    import attrs

    from lsm_registry import Mixer

    with pytest.raises(TypeError, match="MixerParams"):

        class Broken(Mixer):  # noqa: F841
            name = "broken"

            @attrs.frozen
            class Params:
                pass

            def mix(self, x_f, x_b, saliency_f, patch):
                raise NotImplementedError


def test_resume_with_new_epochs_checks_the_window(write_recipe, tmp_path):
    path = write_recipe(MIXING.format(mixer="lsm") + "start_epoch = 1\nend_epoch = -1\n")
    out = tmp_path / "run"
    runner = CliRunner()
    first = runner.invoke(cli, ["run", str(path), "--out", str(out), "--set", "run.epochs=3", "--no-progress"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(cli, ["resume", str(out), "--set", "run.epochs=2", "--no-progress"])
    assert again.exit_code == 2
    assert "is empty for run.epochs = 2" in again.output


def test_a_batch_larger_than_the_training_set_is_refused(write_recipe, registry):
    path = write_recipe(TINY_RECIPE)
    recipe = load_recipe(path, ["optim.batch_size=1000"], registry)
    with pytest.raises(LSMError, match=r"\[optim\].batch_size = 1000 is larger than the training set of synthetic-lt"):
        Trainer(recipe, registry)


def _mixing_run(write_recipe, tmp_path, prob: float):
    path = write_recipe(MIXING.format(mixer="lsm") + f"start_epoch = 0\nend_epoch = 100\nprob = {prob}\n")
    out = tmp_path / f"run-{prob}"
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_mixed_samples_come_from_what_the_run_mixed(write_recipe, tmp_path, registry):
    pytest.importorskip("matplotlib")
    out, _ = _mixing_run(write_recipe, tmp_path, prob=1.0)
    assert (out / "mixed_samples.png").is_file()
    # A run whose coin never came up mixes nothing, and then draws nothing.
    out, output = _mixing_run(write_recipe, tmp_path, prob=1e-9)
    metrics = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert '"mixed_fraction": 0.0' in metrics[-1]
    assert not (out / "mixed_samples.png").exists()
    assert "mixed_samples.png not drawn: no batch was mixed" in output


def test_the_trainer_keeps_the_last_batch_it_really_mixed(write_recipe, registry):
    path = write_recipe(MIXING.format(mixer="lsm") + "start_epoch = 0\nend_epoch = 100\nprob = 1.0\n")
    trainer = Trainer(load_recipe(path, [], registry), registry)
    seen = []
    step = trainer.mixing

    class Recording:
        def __getattr__(self, name):
            return getattr(step, name)

        def __call__(self, *args, **kwargs):
            seen.append(step(*args, **kwargs))
            return seen[-1]

    trainer.mixing = Recording()
    trainer.fit()
    assert seen, "prob 1 and an open window must mix"
    last = trainer.last_mixed
    assert last is not None and len(last) == min(8, len(seen[-1]))
    assert (last.images == seen[-1].images[: len(last)]).all()
    assert (last.y_f == seen[-1].y_f[: len(last)]).all()


# ------------------------------------------------------------------------ --unset


def test_unset_sets_an_optional_key_to_none_and_round_trips(write_recipe, tmp_path):
    path = write_recipe(MIXING.format(mixer="lsm"))
    runner = CliRunner()
    shown = runner.invoke(cli, ["show", str(path), "--unset", "mixer.end_epoch", "--set", "run.epochs=6"])
    assert shown.exit_code == 0, shown.output
    assert "end_epoch = { none = true }" in shown.output
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(shown.output)
    again = runner.invoke(cli, ["show", str(resolved)])
    assert again.exit_code == 0 and again.output == shown.output
    assert load_recipe(resolved).mixer.params.end_epoch is None


def test_unset_of_a_required_key_is_one_line(write_recipe):
    path = write_recipe(TINY_RECIPE)
    result = CliRunner().invoke(cli, ["show", str(path), "--unset", "run.epochs"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {path} [run].epochs: cannot be unset: it takes int, and none is not one of its values"
    ]


def test_none_like_strings_stay_strings(write_recipe):
    """The spelling of none cannot collide with a string value."""
    path = write_recipe('[data]\nname = "cifar10-lt"\n')
    for word in ("none", "None", "null"):
        recipe = load_recipe(path, [f"data.root={word}"])
        assert recipe.data.params.root == word
    assert load_recipe(path, ["data.root=x", "data.root={ none = true }"]).data.params.root is None
    assert (
        tomllib.loads(load_recipe(path, ["model.name=torchvision", "model.weights=null"]).to_toml())["model"]["weights"]
        == "null"
    )


def test_mixing_tables_without_a_mixer_are_refused(write_recipe, registry):
    path = write_recipe(TINY_RECIPE + '\n[label_fuser]\nname = "saliency2"\n\n[saliency]\nname = "gradcam"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path, [], registry)
    assert sorted(line.split(" ")[1] for line in info.value.lines) == ["[label_fuser]:", "[saliency]:"]
    assert all("there is no [mixer] table" in line for line in info.value.lines)
