"""lsm_registry.testing: every registered component passes, and broken ones are caught."""

from __future__ import annotations

import attrs
import pytest
import torch
import torch.nn.functional as F

from lsm_registry import (
    DatasetFactory,
    LabelFuser,
    Loss,
    Mixer,
    MixerParams,
    MixResult,
    ModelFactory,
    PatchOperator,
    SaliencyProvider,
    Sampler,
)
from lsm_registry.params import param, positive
from lsm_registry.plugins import build_registry
from lsm_registry.testing import TEST_OWNER, ReferencePatch, check_component, tiny_model

BUILTINS = build_registry(entry_points=False)

#: Cheaper settings for built-ins whose defaults are costly on a CPU (the defaults
#: still go through the Params checks).
CHEAPER = {("model", "torchvision"): {"arch": "regnet_x_400mf"}, ("model", "resnet32"): {"width": 4}}


@pytest.mark.parametrize("entry", BUILTINS.list(), ids=lambda e: f"{e.kind}:{e.name}")
def test_every_registered_component_conforms(entry):
    params = None
    if (entry.kind, entry.name) in CHEAPER:
        params = entry.cls.Params(**CHEAPER[(entry.kind, entry.name)])
    check_component(entry.cls, BUILTINS, params=params)


def test_every_kind_has_a_builtin_to_check():
    assert {e.kind for e in BUILTINS.list()} >= {
        "sampler",
        "saliency",
        "patch",
        "mixer",
        "label_fuser",
        "loss",
        "model",
        "dataset",
    }


def test_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    check_component(BUILTINS.get("mixer", BUILTINS.names("mixer")[0]))
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------ components that break a promise


def fails(cls, match: str, **kw) -> str:
    with pytest.raises(AssertionError, match=match) as info:
        check_component(cls, **kw)
    message = str(info.value)
    assert f"'{cls.name}'" in message or cls.__qualname__ in message
    return message


class Uniform(SaliencyProvider):
    """Uniform scores."""

    name = "t-uniform"

    @attrs.frozen
    class Params:
        pass

    def __call__(self, model, x, y, patch):
        gh, gw = patch.grid(*x.shape[-2:])
        return torch.full((x.shape[0], gh, gw), 1.0 / (gh * gw), device=x.device)


def test_a_good_component_passes_and_registers_under_the_test_owner():
    registry = build_registry(entry_points=False)
    check_component(Uniform, registry)
    assert registry.entry("saliency", "t-uniform").owner == TEST_OWNER
    check_component(Uniform, registry)  # already registered as itself: still fine


def test_negative_saliency():
    class Negative(Uniform):
        """Scores below zero."""

        name = "t-negative"

        def __call__(self, model, x, y, patch):
            return super().__call__(model, x, y, patch) - 1.0

    fails(Negative, r"must be >= 0.0")


def test_saliency_of_the_wrong_shape():
    class Pixels(Uniform):
        """One score per pixel."""

        name = "t-pixels"

        def __call__(self, model, x, y, patch):
            return x.mean(dim=1).abs()

    fails(Pixels, r"has shape \(4, 16, 16\), expected \(4, 4, 4\)")


def test_saliency_that_updates_batch_norm_statistics():
    class TrainForward(Uniform):
        """Runs the model in train mode."""

        name = "t-train-forward"

        def __call__(self, model, x, y, patch):
            with torch.no_grad():
                model(x)
            return super().__call__(model, x, y, patch)

    fails(TrainForward, r"changed the model's parameters or buffers: .*running_mean")


def test_saliency_that_leaves_gradients():
    class Backward(Uniform):
        """Backpropagates into the parameters."""

        name = "t-backward"

        def __call__(self, model, x, y, patch):
            model.eval()
            model(x).sum().backward()
            model.train()
            return super().__call__(model, x, y, patch)

    fails(Backward, r"(changed the model's train/eval mode|left parameter gradients)")


def test_saliency_nan_on_constant_images():
    class MinMax(Uniform):
        """Min-max without a guard."""

        name = "t-minmax"

        def __call__(self, model, x, y, patch):
            s = F.avg_pool2d(x.mean(dim=1, keepdim=True), patch.size).squeeze(1)
            lo, hi = s.amin(dim=(1, 2), keepdim=True), s.amax(dim=(1, 2), keepdim=True)
            return (s - lo) / (hi - lo)

    fails(MinMax, r"saliency of constant images .* NaN")


def test_global_rng_instead_of_the_context_generator():
    class GlobalNoise(Uniform):
        """torch.rand without the generator."""

        name = "t-global-noise"

        def __call__(self, model, x, y, patch):
            return torch.rand(super().__call__(model, x, y, patch).shape)

    fails(GlobalNoise, r"differs between two builds with equally seeded context.generator")


class Blend(Mixer):
    """Half and half."""

    name = "t-blend"

    @attrs.frozen
    class Params(MixerParams):
        pass

    def mix(self, x_f, x_b, saliency_f, patch):
        w = torch.full_like(x_f[:, :1], 0.5)
        return MixResult(images=w * x_f + (1 - w) * x_b, weight=w)


def test_mixer_images_must_follow_the_weight():
    class Liar(Blend):
        """Says 0.5, pastes everything."""

        name = "t-liar"

        def mix(self, x_f, x_b, saliency_f, patch):
            return MixResult(images=x_f.clone(), weight=torch.full_like(x_f[:, :1], 0.5))

    check_component(Blend)
    fails(Liar, r"images != weight \* x_f \+ \(1 - weight\) \* x_b")


def test_mixer_weight_in_unit_range_and_mask_consistent():
    class Overshoot(Blend):
        """Weight 1.5."""

        name = "t-overshoot"

        def mix(self, x_f, x_b, saliency_f, patch):
            w = torch.full_like(x_f[:, :1], 1.5)
            return MixResult(images=w * x_f + (1 - w) * x_b, weight=w)

    class WrongMask(Blend):
        """A unit mask that disagrees with the weight."""

        name = "t-wrong-mask"

        def mix(self, x_f, x_b, saliency_f, patch):
            res = super().mix(x_f, x_b, saliency_f, patch)
            gh, gw = patch.grid(*x_f.shape[-2:])
            return MixResult(res.images, res.weight, torch.ones(x_f.shape[0], gh, gw, dtype=torch.bool))

    fails(Overshoot, r"must be <= 1.0")
    fails(WrongMask, r"weight is not the unit_mask expanded")


def test_mixer_that_writes_into_its_input():
    class InPlace(Blend):
        """Pastes into the background tensor."""

        name = "t-in-place"

        def mix(self, x_f, x_b, saliency_f, patch):
            x_b[:, :, :4, :4] = x_f[:, :, :4, :4]
            w = torch.zeros_like(x_f[:, :1])
            w[:, :, :4, :4] = 1
            return MixResult(images=x_b, weight=w)

    fails(InPlace, r"changed its input images in place")


class Half(LabelFuser):
    """Half to each label."""

    name = "t-half"

    @attrs.frozen
    class Params:
        pass

    def fuse(self, mix, y_f, y_b, saliency_f, saliency_b):
        return self.two_label(torch.full((y_f.shape[0],), 0.5), y_f, y_b)


def test_fuser_rows_must_be_distributions():
    class Unnormalised(Half):
        """Forgets to normalise."""

        name = "t-unnormalised"

        def fuse(self, mix, y_f, y_b, saliency_f, saliency_b):
            return 2 * super().fuse(mix, y_f, y_b, saliency_f, saliency_b)

    class Sharp(Half):
        """Divides by the saliency sum without a guard."""

        name = "t-sharp"

        def fuse(self, mix, y_f, y_b, saliency_f, saliency_b):
            lam = (saliency_f * mix.weight[:, 0, ::4, ::4]).sum(dim=(1, 2)) / (saliency_f * 0).sum(dim=(1, 2))
            return self.two_label(lam, y_f, y_b)

    check_component(Half)
    fails(Unnormalised, r"rows must sum to 1")
    fails(Sharp, r"NaN")


class Plain(Loss):
    """Cross-entropy on hard or soft targets."""

    name = "t-plain"

    @attrs.frozen
    class Params:
        pass

    def __call__(self, logits, target, mixed=None):
        logp = F.log_softmax(logits, dim=1)
        if target.dim() == 1:
            return F.nll_loss(logp, target)
        return -(target * logp).sum(dim=1).mean()


def test_loss_soft_one_hot_must_equal_hard():
    class SoftSmoothed(Plain):
        """Soft targets smoothed again."""

        name = "t-soft-smoothed"

        def __call__(self, logits, target, mixed=None):
            if target.dim() == 2:
                target = 0.9 * target + 0.1 / target.shape[1]
            return super().__call__(logits, target)

    check_component(Plain)
    fails(SoftSmoothed, r"one-hot soft targets must give the hard-target loss")


def test_loss_nan_on_constant_logits():
    class Standardised(Plain):
        """Standardises logits without a guard."""

        name = "t-standardised"

        def __call__(self, logits, target, mixed=None):
            return super().__call__((logits - logits.mean()) / logits.std(), target)

    fails(Standardised, r"constant logits.*NaN")


class Ordered(Sampler):
    """Indices in order, no second branch."""

    name = "t-ordered"

    @attrs.frozen
    class Params:
        pass

    def steps_per_epoch(self, batch_size):
        return (self.labels.numel() // self.world_size) // batch_size

    def batches(self, epoch, batch_size):
        idx = torch.arange(self.rank, self.labels.numel(), self.world_size)
        for s in range(self.steps_per_epoch(batch_size)):
            yield idx[s * batch_size : (s + 1) * batch_size], None


def test_sampler_out_of_range_repeats_and_overlapping_ranks():
    class OffByOne(Ordered):
        """Indices shifted by one."""

        name = "t-off-by-one"

        def batches(self, epoch, batch_size):
            for bg, fg in super().batches(epoch, batch_size):
                yield bg + 1 + self.labels.numel() // 2, fg

    class Repeats(Ordered):
        """Index zero every batch."""

        name = "t-repeats"

        def batches(self, epoch, batch_size):
            for bg, fg in super().batches(epoch, batch_size):
                yield torch.cat([bg[:1] * 0, bg[1:]]), fg

    class Unsharded(Ordered):
        """Ignores the rank."""

        name = "t-unsharded"

        def batches(self, epoch, batch_size):
            idx = torch.arange(self.labels.numel() // self.world_size)
            for s in range(self.steps_per_epoch(batch_size)):
                yield idx[s * batch_size : (s + 1) * batch_size], None

    check_component(Ordered)
    fails(OffByOne, r"background indices .* must be <= 22")
    fails(Repeats, r"repeats an index within an epoch")
    fails(Unsharded, r"ranks 0 and 1 of 2 draw the same background indices")


def test_patch_operator_must_be_exact_and_local():
    class Transposed(ReferencePatch):
        """Units in the wrong place."""

        name = "t-transposed"

        @attrs.frozen
        class Params:
            size: int = param(4, help="block side", validator=positive)

        def __init__(self, params, context):
            PatchOperator.__init__(self, params, context)

        def split(self, x):
            return super().split(x.transpose(-1, -2))

        def merge(self, u):
            return super().merge(u).transpose(-1, -2)

    fails(Transposed, r"is not the p x p block at that place")


def test_model_logits_shape():
    class Features(ModelFactory):
        """Returns features, not logits."""

        name = "t-features"

        @attrs.frozen
        class Params:
            pass

        def build(self, num_classes, in_channels, normed_head):
            net = tiny_model(num_classes)
            net.forward = net.forward_features
            return net

    fails(Features, r"logits has shape \(2, 64, 4, 4\), expected \(2, 4\)|logits has shape")


def test_dataset_only_params_are_checked():
    class NeedsFiles(DatasetFactory):
        """Reads files that are not here."""

        name = "t-needs-files"

        @attrs.frozen
        class Params:
            root: str = param("/nowhere", help="data folder")

        def build(self):
            raise FileNotFoundError(self.params.root)

    check_component(NeedsFiles)


def test_params_without_help_or_valid_defaults():
    class NoHelp(Uniform):
        """Params field without help."""

        name = "t-no-help"

        @attrs.frozen
        class Params:
            k: int = 3

    class Invalid(Uniform):
        """Default fails validation."""

        name = "t-invalid"

        @attrs.frozen
        class Params:
            k: int = param(0, help="k", validator=positive)

    fails(NoHelp, r"Params.k has no help text")
    fails(Invalid, r"Params\(\) fails with its defaults")


def test_name_taken_by_a_builtin():
    class Impostor(Uniform):
        """Claims gradcam."""

        name = "gradcam"

    message = fails(Impostor, r"the name 'gradcam' is already taken")
    assert "lsm-registry" in message


def test_an_exception_becomes_an_assertion_naming_the_component():
    class Crashes(Blend):
        """Crashes on mix."""

        name = "t-crashes"

        def mix(self, x_f, x_b, saliency_f, patch):
            raise RuntimeError("shape mismatch somewhere")

    fails(Crashes, r"raised RuntimeError during the mixer checks: shape mismatch somewhere")
