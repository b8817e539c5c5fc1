"""Second stages: a run that starts from another run's weights and trains only part of the model.

Kang et al. (ICLR 2020) showed that long-tailed recognition splits into learning the
representation (stage 1, instance-balanced) and re-balancing the classifier on the
frozen representation (stage 2: cRT re-trains a fresh classifier with class-balanced
sampling, LWS learns one scale per class, tau-normalisation rescales the trained
weights without training). A recipe's ``[stage]`` table says where the weights come
from and what trains; this module does it, so the engine keeps one loop.

The parent's weights are read only when a run starts afresh: a resumed stage-2 run
loads its own checkpoint and no longer needs the parent (it may have been deleted).
Everything is read through :func:`lsm_registry.checkpoint.read_model_state`, weights
only, so a parent checkpoint can never run code.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

import attrs
import torch
from torch import nn

from .checkpoint import BEST_CHECKPOINT, CHECKPOINT_DIR, list_checkpoints, read_model_state
from .errors import LSMError
from .recipe import FROZEN_BN_PARTS, Recipe

#: [model] parameters a stage may set differently from its parent: they add parameters
#: (LWS's scales) or change the classifier alone (``head``: PC's prototypes in place of the
#: linear layer, with ``reset_classifier``), never a weight of the backbone the parent trained.
HEAD_OPTIONS = ("lws", "head")
#: State keys a stage's model may have that its parent lacks; they keep their fresh values.
NEW_KEYS = ("logit_scale",)
#: ``train`` values whose batch norm ``bn = "auto"`` keeps in eval mode (statistics frozen).
FROZEN_BN = FROZEN_BN_PARTS
#: ``train`` values that also train every batch norm's affine parameters (weight, bias).
TRAINED_BN = ("classifier+bn",)


def classifier_of(module: nn.Module, recipe: Recipe) -> nn.Module:
    """The model's ``classifier``: the ABI's name for the head, the one way to tell it from the backbone."""
    head = getattr(module, "classifier", None)
    if not isinstance(head, nn.Module):
        raise LSMError(
            f"{recipe.path} [stage]: model {recipe.model.name!r} has no `classifier` module, so its "
            "classifier cannot be told apart from its backbone; a stage needs one (docs/contracts.md, model)"
        )
    return head


def head_keys(module: nn.Module, recipe: Recipe) -> set[str]:
    """State keys of the classifier and of the LWS scales (what ``reset_classifier`` starts afresh)."""
    keys = {f"classifier.{k}" for k in classifier_of(module, recipe).state_dict()}
    return keys | {k for k in module.state_dict() if k in NEW_KEYS}


def batch_norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def trainable_parameters(module: nn.Module, recipe: Recipe) -> list[nn.Parameter]:
    """The parameters the stage trains; every other one gets ``requires_grad = False``.

    Frozen parameters are left out of the optimizer too, so neither weight decay nor
    momentum can move them.
    """
    train = recipe.stage.train
    if train == "all":
        return list(module.parameters())
    scale = getattr(module, "logit_scale", None)
    if train == "scales":
        if not isinstance(scale, nn.Parameter):
            raise LSMError(
                f'{recipe.path} [stage].train: "scales" needs a model with per-class logit scales '
                f"(model.lws = true); model {recipe.model.name!r} has none"
            )
        chosen = [scale]
    else:
        chosen = list(classifier_of(module, recipe).parameters()) + ([scale] if isinstance(scale, nn.Parameter) else [])
        if train in TRAINED_BN:
            chosen += [p for bn in batch_norms(module) for p in (bn.weight, bn.bias) if p is not None]
    ids = {id(p) for p in chosen}
    for p in module.parameters():
        p.requires_grad_(id(p) in ids)
    return [p for p in module.parameters() if p.requires_grad]


def set_train_mode(module: nn.Module, recipe: Recipe, norms: list[nn.Module]) -> None:
    """``module.train()``, with batch norm back in eval mode when the stage keeps its statistics (``[stage].bn``).

    In train mode batch norm normalises with the batch's statistics and updates its
    running ones on every forward, even where no parameter trains. Kang et al.'s code
    (cRT, LWS) and MiSLAS's shift learning want exactly that: the statistics
    re-estimated on the class-balanced batches ``bn = "train"``. ``bn = "frozen"``
    keeps the parent's statistics; ``"auto"`` is what a recipe without the key meant.
    """
    module.train()
    if recipe.stage.bn_frozen:
        for bn in norms:  # the module's batch_norms(), found once by the caller: this runs every step
            bn.eval()


# ------------------------------------------------------------------------------ the parent


def parent_checkpoint(recipe: Recipe) -> tuple[Path, Optional[Path]]:
    """(the checkpoint to start from, the parent run folder or None when ``init_from`` names a file).

    ``init_checkpoint = "best"`` takes the run folder's ``checkpoints/best.pt`` (the best
    epoch on its validation split), as CC-SAM's code starts its stage 2 from its best model.
    """
    init_from = recipe.stage.init_from
    where = f"{recipe.path} [stage].init_from = {init_from!r}"
    path = Path(init_from)
    if recipe.stage.init_checkpoint == "best":
        return _best_of(recipe, path), path
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise LSMError(
                f"{where}: no checkpoint in {path / CHECKPOINT_DIR}; train the stage-1 recipe into that folder first"
            )
        return found[-1], path
    if path.is_file():
        return path, None
    raise LSMError(
        f"{where}: no such run folder or checkpoint file (relative paths start in the current folder); "
        "train the stage-1 recipe first"
    )


def _best_of(recipe: Recipe, run_dir: Path) -> Path:
    """``run_dir``'s best.pt, or a one-line error saying why there is none."""
    where = f'{recipe.path} [stage].init_checkpoint = "best"'
    best = run_dir / CHECKPOINT_DIR / BEST_CHECKPOINT
    if best.is_file():
        return best
    if not run_dir.is_dir():
        raise LSMError(
            f"{where}: init_from = {recipe.stage.init_from!r} is not a run folder; a best checkpoint is a run "
            'folder\'s checkpoints/best.pt (name a file with init_checkpoint = "last")'
        )
    raise LSMError(
        f"{where}: {run_dir} has no {CHECKPOINT_DIR}/{BEST_CHECKPOINT} (a run keeps one only with a validation "
        'split, [data] val_per_class > 0, once it has evaluated); use init_checkpoint = "last"'
    )


def _summary_class_count(run_dir: Optional[Path]) -> Optional[int]:
    if run_dir is None:
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    counts = summary.get("class_counts") if isinstance(summary, dict) else None
    return len(counts) if isinstance(counts, list) and counts else None


def _normalised(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_model_table(recipe: Recipe, parent_recipe: Any, where: str) -> None:
    """Same model name and parameters as the parent (head options aside), named in one line."""
    if not isinstance(parent_recipe, dict) or not isinstance(parent_recipe.get("model"), dict):
        return  # a bare state_dict: the state keys and shapes are checked instead
    table = dict(parent_recipe["model"])
    name = table.pop("name", None)
    if name != recipe.model.name:
        raise LSMError(
            f"{where}: the parent's model is {name!r}, this recipe's is {recipe.model.name!r}; "
            "a stage must keep the parent's model"
        )
    defaults = attrs.asdict(type(recipe.model.params)(), recurse=False)
    ours = attrs.asdict(recipe.model.params, recurse=False)
    differ = [
        f"{key} ({_normalised(table.get(key, defaults[key]))!r} -> {_normalised(ours[key])!r})"
        for key in ours
        if key not in HEAD_OPTIONS and _normalised(table.get(key, defaults[key])) != _normalised(ours[key])
    ]
    if differ:
        raise LSMError(
            f"{where}: the parent's model {name!r} differs in "
            + ", ".join(differ)
            + "; a stage must keep the parent's model"
        )


def _skipped_head(recipe: Recipe, state: dict[str, Any], head: set[str], where: str) -> set[str]:
    """The state keys not to load: with ``reset_classifier`` this model's head and the parent's
    classifier, which differ when the stage builds another head (``model.head``); none otherwise,
    and a parent whose classifier has other parameters is then one line naming the setting."""
    theirs = {k for k in state if k.startswith("classifier.")}
    if recipe.stage.reset_classifier:
        return head | theirs
    ours = {k for k in head if k.startswith("classifier.")}
    if theirs != ours:
        raise LSMError(
            f"{where}: the parent's classifier has {', '.join(sorted(theirs)) or 'no parameters'}, this "
            f"recipe's {', '.join(sorted(ours))} (another model.head); set stage.reset_classifier = true "
            "to start the new head afresh"
        )
    return set()


def load_parent(recipe: Recipe, module: nn.Module, num_classes: int) -> dict[str, Any]:
    """Load the parent's weights into ``module`` (a fresh build of this recipe's model); returns the parent record.

    With ``reset_classifier`` the parent's classifier is not loaded: the module keeps the
    classifier its factory just initialised from the run seed, the fresh one cRT wants.
    Fails in one line when the parent is missing or is another model or class count.
    """
    path, run_dir = parent_checkpoint(recipe)
    where = f"{recipe.path} [stage].init_from = {recipe.stage.init_from!r}"
    state, checkpoint = read_model_state(path)
    parent_recipe = checkpoint.get("recipe")
    _check_model_table(recipe, parent_recipe, where)
    parent_classes = _summary_class_count(run_dir)
    if parent_classes is not None and parent_classes != num_classes:
        raise LSMError(
            f"{where}: the parent was trained on {parent_classes} classes, this recipe's data has {num_classes}"
        )
    own = module.state_dict()
    head = head_keys(module, recipe)
    # A head reset_classifier starts afresh may differ in shape (a normed head after a plain one).
    for key in sorted(head - set(NEW_KEYS)) if not recipe.stage.reset_classifier else ():
        if key in state and tuple(state[key].shape) != tuple(own[key].shape):
            raise LSMError(
                f"{where}: the parent's {key} has shape {tuple(state[key].shape)}, this recipe's model "
                f"{tuple(own[key].shape)} ({num_classes} classes): another class count or head"
            )
    skip = _skipped_head(recipe, state, head, where)
    wanted = {k: v for k, v in state.items() if k not in skip}
    unexpected = sorted(set(wanted) - set(own))
    missing = sorted(set(own) - set(wanted) - skip - set(NEW_KEYS))
    if unexpected or missing:
        parts = ([f"missing {', '.join(missing[:4])}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected[:4])}"] if unexpected else []
        )
        raise LSMError(f"{where}: {path} does not fit this recipe's model ({'; '.join(parts)})")
    try:
        module.load_state_dict(wanted, strict=False)
    except RuntimeError as exc:
        raise LSMError(
            f"{where}: {path} does not fit this recipe's model ({' '.join(str(exc).splitlines()[:2])})"
        ) from None
    run = parent_recipe.get("run") if isinstance(parent_recipe, dict) else None
    run_name = run.get("name") if isinstance(run, dict) else None
    grandparent = checkpoint.get("parent")
    return {
        "init_from": recipe.stage.init_from,
        "checkpoint": str(path),
        "run_name": run_name or (run_dir.name if run_dir is not None else None),
        "epoch": checkpoint.get("epoch"),
        "step": checkpoint.get("step"),
        # The parent's resolved recipe (None for a bare state_dict) and, when the parent was
        # itself a stage, its own parent record: what `lsm compare` groups stage-2 runs by,
        # so that the seeds of a two-stage method form one row (lsm_registry.runfolder.reader).
        "recipe": parent_recipe if isinstance(parent_recipe, dict) else None,
        "parent": grandparent if isinstance(grandparent, dict) else None,
    }


# ------------------------------------------------------------------------------ tau-normalisation


def tau_normalised(module: nn.Module, tau: float) -> nn.Module:
    """A copy of ``module`` whose last linear layer has rows ``w_c / ||w_c|| ** tau`` and no bias.

    Kang et al.'s tau-normalisation: training on long-tailed data leaves head classes with
    larger weight norms, and dividing by a power of the norm evens the decision
    boundaries without training. The bias is dropped as in their ``tau_norm.py``, so
    ``tau = 0`` is the trained classifier without its bias. The original is left as it was.
    """
    if not tau >= 0:
        raise LSMError(f"tau-norm: tau must be >= 0 (got {tau})")
    out = copy.deepcopy(module)
    head = getattr(out, "classifier", None)
    leaves = (
        [m for m in head.modules() if any(True for _ in m.parameters(recurse=False))]
        if isinstance(head, nn.Module)
        else []
    )
    if not leaves or not isinstance(leaves[-1], nn.Linear):
        raise LSMError(
            "tau-norm needs a model whose `classifier` ends in a plain linear layer (nn.Linear); "
            "this one does not (a cosine head, as LDAM's, is normalised already)"
        )
    last = leaves[-1]
    with torch.no_grad():
        norm = last.weight.norm(dim=1, keepdim=True).clamp_min(torch.finfo(last.weight.dtype).tiny)
        last.weight.div_(norm.pow(tau))
        if last.bias is not None:
            last.bias.zero_()
    return out
