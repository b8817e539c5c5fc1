import json

from click.testing import CliRunner

from lsm_registry.cli import cli


def test_help_lists_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "show", "list-components"):
        assert command in result.output


def test_list_components_shows_builtins_with_provider():
    result = CliRunner().invoke(cli, ["list-components", "--kind", "loss"])
    assert result.exit_code == 0, result.output
    assert "ce" in result.output and "lsm-registry" in result.output
    assert "resnet32" not in result.output


def test_list_components_wildcard():
    result = CliRunner().invoke(cli, ["list-components", "synth*"])
    assert result.exit_code == 0
    assert "synthetic-lt" in result.output and "resnet32" not in result.output


def test_show_prints_the_resolved_recipe(tiny_recipe):
    result = CliRunner().invoke(cli, ["show", str(tiny_recipe), "--set", "run.epochs=7"])
    assert result.exit_code == 0, result.output
    assert "epochs = 7" in result.output and "[sampler]" in result.output and 'name = "instance"' in result.output


def test_unknown_loss_is_one_line_and_exit_2(write_recipe, tmp_path):
    from conftest import TINY_RECIPE

    path = write_recipe(TINY_RECIPE.replace('name = "ce"', 'name = "cee"'))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Did you mean 'ce'?" in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists(), "nothing may be written before the recipe validates"


def test_run_writes_the_run_folder(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(tiny_recipe), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Many" in result.output and "Few" in result.output
    summary = json.loads((out / "summary.json").read_text())
    for key in ("top1", "many", "medium", "few", "per_class", "epochs", "best_top1", "best_epoch"):
        assert key in summary
    assert len(summary["per_class"]) == 4
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1
    assert (out / "per_class.csv").read_text().startswith("class,name,train_count,group,accuracy")
    assert "[run]" in (out / "recipe.toml").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for picture in ("per_class.png", "confusion.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_mixing_run_draws_its_mixed_samples(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    args = ["run", str(tiny_recipe), "--out", str(out), "--no-progress", "--set", "sampler.name=dual-branch",
            "--set", "mixer.name=lsm", "--set", "mixer.start_epoch=0", "--set", "mixer.end_epoch=100", "--set", "mixer.end_epoch=1", "--set", "mixer.prob=1.0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (out / "mixed_samples.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["mixed_fraction"] == 1.0 and 0.0 < record["fg_label_weight"] < 1.0


def test_an_unknown_saliency_layer_is_refused_before_training(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    args = ["run", str(tiny_recipe), "--out", str(out), "--set", "sampler.name=dual-branch", "--set", "mixer.name=lsm",
            "--set", "mixer.start_epoch=0", "--set", "mixer.end_epoch=100", "--set", "saliency.layer=nope"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "[saliency]" in lines[0] and "'nope'" in lines[0] and "layer3" in lines[0]
    assert not out.exists()
