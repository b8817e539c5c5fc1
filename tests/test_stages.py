"""Second stages (Kang et al.'s decoupling): [stage], the class-balanced sampler, LWS, tau-norm."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_RECIPE, trainer_for
from torch import nn

from lsm_registry.checkpoint import list_checkpoints, read_model_state
from lsm_registry.cli import cli
from lsm_registry.components.models import NormedLinear
from lsm_registry.components.samplers import ClassBalancedSampler
from lsm_registry.engine import Trainer
from lsm_registry.errors import LSMError, RecipeError
from lsm_registry.interfaces import Context
from lsm_registry.recipe import load_recipe
from lsm_registry.runfolder import reader as runs
from lsm_registry.stages import tau_normalised


def stage_recipe(
    parent: Path | str,
    train: str = "classifier",
    reset: bool = True,
    extra: str = "",
    sampler: str = "class-balanced",
    name: str = "tiny-stage2",
) -> str:
    text = TINY_RECIPE.replace('name = "tiny"', f'name = "{name}"')
    text = text.replace("width = 4", "width = 4" + extra)
    return (
        text
        + f"""
[stage]
init_from = "{parent}"
train = "{train}"
reset_classifier = {"true" if reset else "false"}

[sampler]
name = "{sampler}"
"""
    )


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.fixture
def parent_state(parent_run) -> dict[str, torch.Tensor]:
    state, _ = read_model_state(list_checkpoints(parent_run)[-1])
    return state


def is_head(key: str) -> bool:
    return key.startswith("classifier.") or key == "logit_scale"


# ------------------------------------------------------------------------------ recipes


def test_stage_settings_that_would_do_nothing_are_refused(write_recipe, registry):
    path = write_recipe(TINY_RECIPE + "\n[stage]\nreset_classifier = true\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, registry=registry)
    assert any("[stage].reset_classifier" in line and "without init_from" in line for line in exc.value.lines)
    path = write_recipe(TINY_RECIPE + '\n[stage]\ninit_from = "runs/x"\ntrain = "scales"\n', "s.toml")
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, registry=registry)
    assert any('[stage].train: "scales"' in line and "model.lws = true" in line for line in exc.value.lines)
    path = write_recipe(TINY_RECIPE + '\n[stage]\ntrain = "classifier"\n', "t.toml")
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, registry=registry)
    assert any("[stage].train" in line for line in exc.value.lines)


def test_a_stage_recipe_validates_before_its_parent_exists(write_recipe):
    """`lsm show` (and the shipped recipe files' test) must not need the stage-1 run."""
    path = write_recipe(stage_recipe("runs/does-not-exist"))
    result = invoke("show", str(path))
    assert result.exit_code == 0, result.output
    assert 'init_from = "runs/does-not-exist"' in result.output


def test_a_missing_parent_fails_in_one_line_before_training(write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_recipe(stage_recipe("runs/no-such-stage1"))
    result = invoke("run", str(path), "--no-progress")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "[stage].init_from = 'runs/no-such-stage1'" in lines[0] and "no such run folder" in lines[0]
    assert not (tmp_path / "runs").exists()  # no run folder was made


def test_a_parent_with_another_model_or_class_count_fails_in_one_line(write_recipe, parent_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wider = stage_recipe(parent_run).replace("width = 4", "width = 8")
    result = invoke("run", str(write_recipe(wider, "wider.toml")), "--no-progress")
    assert result.exit_code == 2
    assert len(error_lines(result)) == 1 and "differs in width (4 -> 8)" in error_lines(result)[0], result.output
    more = stage_recipe(parent_run).replace("num_classes = 4", "num_classes = 5")
    result = invoke("run", str(write_recipe(more, "more.toml")), "--no-progress")
    assert result.exit_code == 2
    assert len(error_lines(result)) == 1 and "trained on 4 classes" in error_lines(result)[0], result.output
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------ freezing


def test_train_classifier_freezes_the_backbone_and_its_batch_norm(write_recipe, registry, parent_run, parent_state):
    trainer = trainer_for(write_recipe, stage_recipe(parent_run), registry)
    before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    for key, value in before.items():  # the backbone is the parent's, bit for bit
        if not is_head(key):
            assert torch.equal(value, parent_state[key]), key
    trainer.fit()
    after = trainer.module.state_dict()
    for key in before:
        if is_head(key):
            continue
        # Parameters and batch-norm statistics (running mean / var, batches tracked) alike.
        assert torch.equal(after[key], before[key]), f"{key} changed in a frozen backbone"
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    trainable = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trainable == {id(p) for p in trainer.module.classifier.parameters()}


def test_train_classifier_and_bn_updates_batch_norm_only_besides_the_classifier(write_recipe, registry, parent_run):
    trainer = trainer_for(write_recipe, stage_recipe(parent_run, train="classifier+bn"), registry)
    before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    bn_keys = {
        f"{name}.{k}"
        for name, m in trainer.module.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for k in m.state_dict()
    }
    trainer.fit()
    after = trainer.module.state_dict()
    for key in before:
        if not is_head(key) and key not in bn_keys:
            assert torch.equal(after[key], before[key]), f"{key} (not batch norm) changed"
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])
    assert not torch.equal(after["bn1.weight"], before["bn1.weight"])


def test_train_classifier_and_bn_stats_moves_statistics_but_no_backbone_parameter(write_recipe, registry, parent_run):
    """MiSLAS's shift learning: batch-norm statistics re-estimated, the affine parameters frozen."""
    trainer = trainer_for(write_recipe, stage_recipe(parent_run, train="classifier+bn-stats", reset=False), registry)
    params = {name for name, _ in trainer.module.named_parameters()}
    before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    trainer.fit()
    after = trainer.module.state_dict()
    for key in params:  # batch-norm weight and bias included
        if not is_head(key):
            assert torch.equal(after[key], before[key]), f"{key} changed; only the classifier trains"
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])
    assert not torch.equal(after["bn1.running_var"], before["bn1.running_var"])
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    trainable = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trainable == {id(p) for p in trainer.module.classifier.parameters()}


def test_reset_classifier_really_resets(write_recipe, registry, parent_run, parent_state):
    fresh = Trainer(load_recipe(write_recipe(TINY_RECIPE, "fresh.toml"), registry=registry), registry)
    reset = trainer_for(write_recipe, stage_recipe(parent_run, reset=True), registry, "reset.toml")
    kept = trainer_for(write_recipe, stage_recipe(parent_run, reset=False), registry, "kept.toml")
    for key in ("classifier.weight", "classifier.bias"):
        assert torch.equal(reset.module.state_dict()[key], fresh.module.state_dict()[key])  # the factory's init
        assert not torch.equal(reset.module.state_dict()[key], parent_state[key])
        assert torch.equal(kept.module.state_dict()[key], parent_state[key])
    assert torch.equal(reset.module.state_dict()["conv1.weight"], parent_state["conv1.weight"])


def test_lws_trains_only_the_scales(write_recipe, registry, parent_run, parent_state):
    text = stage_recipe(parent_run, train="scales", reset=False, extra="\nlws = true")
    trainer = trainer_for(write_recipe, text, registry)
    scale = trainer.module.logit_scale
    assert torch.equal(scale.detach(), torch.ones(4))  # starts at the parent's exact logits
    before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    assert torch.equal(before["classifier.weight"], parent_state["classifier.weight"])
    trainer.fit()
    after = trainer.module.state_dict()
    for key in before:
        if key != "logit_scale":
            assert torch.equal(after[key], before[key]), f"{key} changed; only the scales train"
    assert not torch.equal(after["logit_scale"], before["logit_scale"])


# ------------------------------------------------------------------------------ the sampler


def test_class_balanced_sampler_draws_each_class_equally_often():
    counts = (400, 100, 20, 5)
    labels = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    sampler = ClassBalancedSampler(
        ClassBalancedSampler.Params(), Context(class_counts=counts, image_size=(3, 8, 8)), labels
    )
    assert sampler.steps_per_epoch(25) == len(labels) // 25  # an epoch as long as an instance-balanced one
    drawn = torch.cat([bg for epoch in range(8) for bg, fg in sampler.batches(epoch, 25)])
    assert all(fg is None for _, fg in sampler.batches(0, 25))
    freq = torch.bincount(labels[drawn], minlength=4).double() / drawn.numel()
    assert torch.allclose(freq, torch.full((4,), 0.25, dtype=torch.float64), atol=0.02), freq
    # The same epoch draws the same batches (resume), another epoch others.
    first = [bg for bg, _ in sampler.batches(3, 25)]
    assert all(torch.equal(a, b) for a, b in zip(first, [bg for bg, _ in sampler.batches(3, 25)]))
    assert not torch.equal(first[0], next(iter(sampler.batches(4, 25)))[0])


def test_class_balanced_sampler_conforms():
    from lsm_registry.testing import check_component

    check_component(ClassBalancedSampler)


# ------------------------------------------------------------------------------ tau-norm


class _Head(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.classifier = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            self.classifier.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


def test_tau_norm_against_the_formula():
    w = torch.tensor([[3.0, 4.0], [0.6, 0.8], [1.0, 0.0]])  # row norms 5, 1, 1
    model = _Head(w, torch.tensor([1.0, -2.0, 0.5]))
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    for tau in (0.0, 0.5, 1.0, 2.0):
        normed = tau_normalised(model, tau)
        expected = torch.stack([row / torch.linalg.vector_norm(row) ** tau for row in w])
        torch.testing.assert_close(normed.classifier.weight, expected)
        torch.testing.assert_close(normed(x), x @ expected.T)  # w_c / ||w_c||^tau, bias dropped
    torch.testing.assert_close(tau_normalised(model, 1.0).classifier.weight.norm(dim=1), torch.ones(3))
    assert torch.equal(model.classifier.weight, w)  # the original is untouched


def test_tau_norm_refuses_a_cosine_head():
    model = _Head(torch.ones(2, 3), torch.zeros(2))
    model.classifier = NormedLinear(3, 2)
    with pytest.raises(LSMError, match="plain linear layer"):
        tau_normalised(model, 1.0)


def test_lsm_tau_norm_re_evaluates_a_finished_run(parent_run, tmp_path):
    out = tmp_path / "tau"
    result = invoke("tau-norm", str(parent_run), "--tau", "0,0.5,1", "--out", str(out))
    assert result.exit_code == 0, result.output
    lines = (out / "tau-norm,test.csv").read_text().splitlines()
    assert lines[0] == "tau,top1,many,medium,few,rare3" and [line.split(",")[0] for line in lines[1:]] == [
        "0",
        "0.5",
        "1",
    ]
    one = json.loads((out / "test,tau=1" / "summary.json").read_text())
    assert one["tau_norm"] == 1.0
    result = invoke("evaluate", str(parent_run), "--tau-norm", "1", "--out", str(tmp_path / "one"))
    assert result.exit_code == 0, result.output
    single = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert single["per_class"] == one["per_class"]  # the command and the option score alike
    result = invoke("tau-norm", str(parent_run), "--tau", "0.5,x")
    assert result.exit_code == 2 and "'x' is not a number" in result.output


# ------------------------------------------------------------------------------ end to end


def test_stage1_then_crt_end_to_end_with_exact_resume(write_recipe, parent_run, tmp_path):
    crt = write_recipe(stage_recipe(parent_run).replace("epochs = 1", "epochs = 2"), "crt.toml")
    straight = tmp_path / "crt-straight"
    result = invoke("run", str(crt), "--out", str(straight), "--no-progress")
    assert result.exit_code == 0, result.output
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["parent"]["run_name"] == "tiny"
    assert summary["parent"]["checkpoint"] == str(list_checkpoints(parent_run)[-1])
    assert summary["parent"]["epoch"] == 1
    # Stopped after one epoch and resumed: the resume never reads the parent again.
    split = tmp_path / "crt-split"
    result = invoke("run", str(crt), "--out", str(split), "--no-progress", "--set", "run.epochs=1")
    assert result.exit_code == 0, result.output
    moved = parent_run.with_name("moved-away")
    parent_run.rename(moved)
    try:
        result = invoke("resume", str(split), "--no-progress", "--set", "run.epochs=2")
    finally:
        moved.rename(parent_run)
    assert result.exit_code == 0, result.output
    resumed = json.loads((split / "summary.json").read_text())
    assert resumed["per_class"] == summary["per_class"] and resumed["final_loss"] == summary["final_loss"]
    assert resumed["parent"] == summary["parent"]
    a, _ = read_model_state(list_checkpoints(straight)[-1])
    b, _ = read_model_state(list_checkpoints(split)[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    result = invoke("compare", str(parent_run), str(straight), "--format", "csv")
    assert result.exit_code == 0, result.output
    header, first, second = result.output.splitlines()[:3]
    assert header.endswith(",parent") and first.endswith(",") and second.endswith(",tiny")


def test_stage2_runs_group_by_their_parents_setting_not_its_path(write_recipe, parent_run, tmp_path):
    """cRT from stage-1 seeds 3 and 4 is one row of two runs; cRT from a stage 1 of another setting is its own row."""
    tiny = write_recipe(TINY_RECIPE, "tiny.toml")
    other_seed, other_lr = tmp_path / "stage1-s4", tmp_path / "stage1-lr"
    for out, extra in ((other_seed, "run.seed=4"), (other_lr, "optim.lr=0.02")):
        result = invoke("run", str(tiny), "--out", str(out), "--no-progress", "--set", extra)
        assert result.exit_code == 0, result.output
    crt = []
    for i, parent in enumerate((parent_run, other_seed, other_lr)):
        crt.append(tmp_path / f"crt-{i}")
        result = invoke(
            "run", str(write_recipe(stage_recipe(parent), f"crt{i}.toml")), "--out", str(crt[-1]), "--no-progress"
        )
        assert result.exit_code == 0, result.output
    summary = json.loads((crt[1] / "summary.json").read_text())
    assert summary["parent"]["recipe"]["run"]["seed"] == 4 and summary["parent"]["parent"] is None
    groups = runs.group_runs(runs.load_runs(crt))
    assert [[r.path for r in g.runs] for g in groups] == [crt[:2], crt[2:]]
    assert groups[0].parents == "tiny (seeds 3, 4)" and groups[1].parents == "tiny"
    assert groups[0].label == "stage.init_from=parent(optim.lr=0.05)", groups[0].label
    assert groups[1].label == "stage.init_from=parent(optim.lr=0.02)", groups[1].label
    result = invoke("compare", *map(str, crt), "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert [(r["runs"], r["parent"]) for r in rows] == [("2", "tiny (seeds 3, 4)"), ("1", "tiny")], result.output
