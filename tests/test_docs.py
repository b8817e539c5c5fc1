"""Docs stay true to the code: every recipe key of [run] and [optim] is documented, and
the code examples of docs/plugins.md run."""

import re
from pathlib import Path

import attrs
import pytest
import torch

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


def python_block(doc: str, heading: str, containing: str = "") -> str:
    """The first ```python block of the section of ``doc`` whose ``##`` heading contains ``heading``
    (and, when given, whose code contains ``containing``)."""
    text = (ROOT / "docs" / doc).read_text()
    found = re.search(rf"^## [^\n]*{re.escape(heading)}[^\n]*$", text, re.M)
    assert found, f"docs/{doc}: no section '{heading}'"
    end = re.compile(r"^## ", re.M).search(text, found.end())
    section = text[found.end() : end.start() if end else len(text)]
    for block in re.findall(r"^```python\n(.*?)^```", section, re.S | re.M):
        if containing in block:
            return block
    raise AssertionError(f"docs/{doc}, section '{heading}': no python block" + (f" with {containing!r}" if containing else ""))


def run_block(code: str, where: str) -> dict:
    namespace = {"__name__": "docs_example"}
    exec(compile(code, where, "exec"), namespace)
    return namespace


def test_plugins_md_mixing_example_runs(capsys):
    from lsm_registry.mixing import MixedBatch

    code = python_block("plugins.md", "Mixing a batch outside the engine")
    ns = run_block(code, "docs/plugins.md: Mixing a batch outside the engine")
    batch = ns["batch"]
    assert isinstance(batch, MixedBatch)
    assert tuple(batch.images.shape) == (8, 3, 16, 16)
    assert tuple(batch.target.shape) == (8, 4)
    assert tuple(batch.mask.shape) == (8, 1, 16, 16)
    assert tuple(batch.unit_mask.shape) == (8, 4, 4)
    assert tuple(batch.saliency_f.shape) == (8, 4, 4)
    assert batch.saliency_b is None
    torch.testing.assert_close(batch.target.sum(dim=1), torch.ones(8))
    # The shapes the doc prints in its comments are the ones printed.
    printed = capsys.readouterr().out
    assert "torch.Size([8, 3, 16, 16]) torch.Size([8, 4])" in printed


def test_plugins_md_example_mixer_conforms():
    from lsm_registry.testing import check_component

    code = python_block("plugins.md", "A component", containing="class MyMixer(Mixer)")
    cls = run_block(code, "docs/plugins.md: A component")["MyMixer"]
    check_component(cls)
    check_component(cls, params=cls.Params(alpha=0.2))  # the call section 7 shows


def test_plugins_md_example_callback_runs_and_conforms():
    from lsm_registry.testing import check_component

    code = python_block("plugins.md", "The tensor contracts", containing="class StopOnPlateau(Callback)")
    cls = run_block(code, "docs/plugins.md: Callbacks")["StopOnPlateau"]
    check_component(cls)
    from lsm_registry import LSMError

    callback = cls(cls.Params(patience=2), None)
    for epoch, loss in enumerate([1.0, 0.9, 0.95]):
        callback.on_epoch_end(None, epoch, {"train_loss": loss})
    with pytest.raises(LSMError, match="for 2 epochs"):
        callback.on_epoch_end(None, 3, {"train_loss": 0.92})


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"^## Python\n.*?^```python\n(.*?)^```", text, re.S | re.M).group(1)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    ns = run_block(code, "README.md: Python")
    run, folder = ns["run"], ns["folder"]
    assert (tmp_path / "runs" / "notebook-demo" / "summary.json").is_file()
    assert {k: v for k, v in folder.summary.items() if k != "format"} == run.summary and folder.metrics[-1]["epoch"] == 2
    assert folder.trained.epoch == run.summary["best_epoch"]
    assert isinstance(folder.model, torch.nn.Module) and not folder.model.training
