import fnmatch
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import table_rows

from lsm_registry import __version__
from lsm_registry.cli import cli
from lsm_registry.plugins import default_registry

COMMANDS = (
    "compare",
    "evaluate",
    "export",
    "list-components",
    "preview",
    "report",
    "resume",
    "run",
    "show",
    "sweep",
    "tau-norm",
)


def help_commands(output: str) -> list[str]:
    """The command names listed in the "Commands:" section of a click --help, in order."""
    lines = output.splitlines()
    start = lines.index("Commands:") + 1
    names = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        names.append(line.split()[0])
    return names


def test_every_command_is_registered_and_listed_in_help():
    import click

    assert cli.list_commands(click.Context(cli)) == list(COMMANDS)
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    assert help_commands(result.output) == list(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_its_own_help(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: cli {name} ")
    import click

    assert cli.get_command(click.Context(cli), name).help.split("\n")[0].split()[0] in result.output


def test_list_components_shows_builtins_with_provider():
    result = CliRunner().invoke(cli, ["list-components", "--kind", "loss"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = table_rows(result.output)
    assert {row[0] for row in rows} == {"loss"}
    names = [row[1] for row in rows]
    assert names == sorted(default_registry().names("loss")) and "ce" in names
    ce = rows[names.index("ce")]
    assert ce[2] == f"lsm-registry {__version__}"
    assert ce[3].startswith("Softmax cross-entropy")


def test_list_components_wildcard():
    result = CliRunner().invoke(cli, ["list-components", "synth*"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    names = [row[1] for row in table_rows(result.output)]
    assert "synthetic-lt" in names
    assert all(fnmatch.fnmatch(name, "synth*") for name in names), names


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
    args = [
        "run",
        str(tiny_recipe),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "sampler.name=dual-branch",
        "--set",
        "mixer.name=lsm",
        "--set",
        "mixer.start_epoch=0",
        "--set",
        "mixer.end_epoch=100",
        "--set",
        "mixer.end_epoch=1",
        "--set",
        "mixer.prob=1.0",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (out / "mixed_samples.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["mixed_fraction"] == 1.0 and 0.0 < record["fg_label_weight"] < 1.0


def test_an_unknown_saliency_layer_is_refused_before_training(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    args = [
        "run",
        str(tiny_recipe),
        "--out",
        str(out),
        "--set",
        "sampler.name=dual-branch",
        "--set",
        "mixer.name=lsm",
        "--set",
        "mixer.start_epoch=0",
        "--set",
        "mixer.end_epoch=100",
        "--set",
        "saliency.layer=nope",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "[saliency]" in lines[0] and "'nope'" in lines[0] and "layer3" in lines[0]
    assert not out.exists()


def test_run_of_two_recipes_trains_both_and_compares(tmp_path, monkeypatch):
    from conftest import TINY_RECIPE

    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base.toml"
    base.write_text(TINY_RECIPE.replace('name = "tiny"', 'name = "base"'))
    mixed = tmp_path / "mixed.toml"
    mixed.write_text(
        TINY_RECIPE.replace('name = "tiny"', 'name = "mixed"')
        + '\n[sampler]\nname = "dual-branch"\n\n[mixer]\nname = "lsm"\nprob = 1.0\nstart_epoch = 0\n'
        + "end_epoch = { none = true }\n"
    )
    result = CliRunner().invoke(cli, ["run", str(base), str(mixed), "--no-progress"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "base" / "summary.json").is_file()
    assert (tmp_path / "runs" / "mixed" / "summary.json").is_file()
    table = result.output[result.output.index("comparison: last epoch") :]
    assert "│ base" in table and "│ mixed" in table and "mixer lsm" in table
    assert (
        f"mixed samples: {Path('runs') / 'mixed' / 'mixed_samples.png'}" in result.output
        or "matplotlib" in result.output
    )


def test_run_validates_every_recipe_before_training(tmp_path, monkeypatch):
    from conftest import TINY_RECIPE

    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.toml"
    good.write_text(TINY_RECIPE)
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_RECIPE.replace('name = "ce"', 'name = "cee"'))
    result = CliRunner().invoke(cli, ["run", str(good), str(bad), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--out names one run folder" in result.output
    result = CliRunner().invoke(cli, ["run", str(good), str(bad)])
    assert result.exit_code == 2 and "unknown loss 'cee'" in result.output
    assert not (tmp_path / "runs").exists()


def test_an_unknown_pattern_in_list_components_is_an_error_with_the_closest_names():
    result = CliRunner().invoke(cli, ["list-components", "gradcm"])
    assert result.exit_code == 2 and "closest: gradcam" in result.output
    result = CliRunner().invoke(cli, ["list-components", "zzz"])
    assert result.exit_code == 2 and "no component matches 'zzz'" in result.output


def test_the_torchvision_model_listing_tells_the_truth_about_weights():
    result = CliRunner().invoke(cli, ["list-components", "--kind", "model", "torchvision"])
    assert result.exit_code == 0 and "no pretrained" not in result.output and "weights" in result.output


@pytest.mark.parametrize("args", [["--help"], ["--version"]])
def test_help_and_version_do_not_import_torch(args):
    import subprocess
    import sys

    code = (
        "import sys\nfrom lsm_registry.cli import cli\ntry:\n    cli(%r, standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)" % (args,)
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_the_lazy_command_list_matches_the_commands():
    import click

    from lsm_registry.cli import COMMANDS as LAZY

    ctx = click.Context(cli)
    for name, (_, _, help_line) in LAZY.items():
        command = cli.get_command(ctx, name)
        assert command.name == name and (command.help or "").strip().splitlines()[0] == help_line, name
