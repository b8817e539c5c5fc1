"""SBCL: subclass-balancing contrastive learning (Hou et al., "Subclass-balancing Contrastive
Learning for Long-tailed Recognition", ICCV 2023).

SupCon over a long-tailed set lets the head classes' many images dominate every
denominator. SBCL splits each head class into subclasses of about a tail class's size
(k-means on the class's embeddings, ``max(1, n_c // M)`` clusters, ``M`` the cluster size)
and contrasts subclasses instead: the subclass term balances the instances, and a second,
class-level term keeps a class's subclasses closer to each other than to other classes'.

Two parts, each of the kind that owns it, and no branch in the engine:

- the loss ``sbcl`` (this module), a contrastive loss on the projection (``[model]
  projection_dim``, two views per image);
- the callback ``subclass-clustering`` (this module), which the loss brings: every
  ``cluster_every`` epochs from ``cluster_start`` on it embeds the training split (eval mode,
  test-time view) and re-clusters every class; each step it looks the batch's subclass labels
  up by the sampled indices (``StepBatch.indices``) and hands them to the loss.

Before the first clustering (the reference's warm-up epochs) the loss is plain SupCon.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.augment import eval_view_batches
from ..errors import LSMError
from ..interfaces import Callback, StepBatch
from ..params import at_least, non_negative, param, positive
from .contrastive import ContrastiveLoss, supcon_loss, supcon_terms

#: Slack added to a class's count before the log in the spread that sets its temperature (the reference's).
DENSITY_OFFSET = 10.0
#: The spreads are clipped to these quantiles before they become temperatures (the reference's 20th and 80th percentiles).
DENSITY_CLIP = (0.2, 0.8)


def cluster_counts(class_counts: Sequence[int], min_cluster_size: int) -> list[int]:
    """Subclasses per class: ``max(1, n_c // M)`` with ``M = max(smallest class count, min_cluster_size)``.

    ``M`` is the size a subclass should have: a tail class's, unless the tail is tinier than
    ``min_cluster_size`` (CIFAR-100-LT's 5 images), where clusters that small would split a
    head class into noise. A tail class stays one subclass.
    """
    present = [n for n in class_counts if n > 0]
    size = max(min(present) if present else 1, min_cluster_size)
    return [max(1, int(n) // size) for n in class_counts]


def kmeans(x: Tensor, k: int, generator: torch.Generator, iterations: int = 35, tol: float = 1e-3) -> Tensor:
    """Cluster index (n,) of every row of ``x`` (n, D) among ``k`` clusters, by cosine k-means.

    Cosine, because the embeddings live on the sphere and the contrastive loss compares
    directions. The reference's rules: centres start at ``k`` distinct random rows, an empty
    cluster restarts at a random row, and it stops when the summed centre shift squared
    falls below ``tol`` or after ``iterations`` rounds. Draws come from ``generator`` (CPU),
    so a run clusters alike on every device and on resume.
    """
    n = x.shape[0]
    x = F.normalize(x.float(), dim=1)
    if k <= 1 or n <= k:
        return torch.arange(n, device=x.device) % max(k, 1)
    centres = x[torch.randperm(n, generator=generator)[:k].to(x.device)]
    assign = torch.zeros(n, dtype=torch.int64, device=x.device)
    for _ in range(iterations):
        assign = (x @ F.normalize(centres, dim=1).T).argmax(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        sizes = torch.bincount(assign, minlength=k).unsqueeze(1)
        restart = x[torch.randint(n, (k,), generator=generator).to(x.device)]
        moved = torch.where(sizes > 0, sums / sizes.clamp_min(1), restart)
        shift = (moved - centres).norm(dim=1).sum()
        centres = moved
        if float(shift) ** 2 < tol:
            break
    return assign


def subclass_labels(
    embeddings: Tensor, labels: Tensor, clusters: Sequence[int], generator: torch.Generator, iterations: int = 35
) -> Tensor:
    """Global subclass index (N,) of every image: class c's clusters are numbered after those of classes < c."""
    out = torch.zeros_like(labels)
    offset = 0
    for c, k in enumerate(clusters):
        rows = (labels == c).nonzero().squeeze(1)
        if rows.numel():
            out[rows] = kmeans(embeddings[rows], k, generator, iterations) + offset
        offset += k
    return out


def class_temperatures(
    embeddings: Tensor, labels: Tensor, clusters: Sequence[int], temperature: float, adaptive: bool = True
) -> Tensor:
    """The class-level term's temperature of each class (C,): the reference's density rule.

    A class whose embeddings spread wide gets a higher temperature, so its subclasses are not
    forced together harder than a compact class's: ``d_c`` = mean distance of the class's
    embeddings from their mean, over ``log(n_c + 10)``; clipped to its 20th..80th percentile;
    ``T_c = temperature * d_c / mean(d)``. A class of one subclass (and every class when not
    ``adaptive``) keeps ``temperature``.
    """
    num_classes = len(clusters)
    single = torch.tensor([k <= 1 for k in clusters], device=embeddings.device)
    if not adaptive or bool(single.all()):
        return torch.full((num_classes,), float(temperature), device=embeddings.device)
    x = embeddings.float()
    counts = torch.bincount(labels, minlength=num_classes).float()
    centres = torch.zeros(num_classes, x.shape[1], device=x.device).index_add_(0, labels, x)
    centres = centres / counts.clamp_min(1).unsqueeze(1)
    spread = torch.zeros(num_classes, device=x.device).index_add_(0, labels, (x - centres[labels]).norm(dim=1))
    density = spread / counts.clamp_min(1) / torch.log(counts + DENSITY_OFFSET)
    lo, hi = (torch.quantile(density, q) for q in DENSITY_CLIP)
    density = density.clamp(lo, hi)
    temps = temperature * density / density.mean()
    return torch.where(single, torch.full_like(temps, float(temperature)), temps)


def class_level_terms(
    embeddings: Tensor, same_class: Tensor, subclasses: Tensor, views: int, temperatures: Tensor
) -> Tensor:
    """Per anchor, the class-level term: pulled towards its class's other subclasses, against other subclasses.

    Positives of ``i``: rows of its class in another subclass (weights ``same_class``, (N, N)),
    and its own other views; the softmax runs over the rows of other subclasses and those
    views (not the rest of ``i``'s own subclass, which the subclass term already holds
    together); temperature ``temperatures[i]`` (N,). The other views make every anchor's
    term defined, a tail image's too (its class is one subclass), as in the reference.
    """
    n = embeddings.shape[0]
    rows = torch.arange(n, device=embeddings.device)
    per_view = n // views
    self_mask = rows.unsqueeze(1) == rows.unsqueeze(0)
    other_view = ((rows.unsqueeze(1) % per_view) == (rows.unsqueeze(0) % per_view)) & ~self_mask
    other_subclass = subclasses.unsqueeze(1) != subclasses.unsqueeze(0)
    candidates = other_subclass | other_view
    weights = same_class * other_subclass + other_view.float()
    sim = embeddings @ embeddings.T / temperatures.unsqueeze(1)
    sim = sim - sim.detach().max(dim=1, keepdim=True).values
    log_prob = sim - torch.logsumexp(sim.masked_fill(~candidates, float("-inf")), dim=1, keepdim=True)
    pulled = (weights * log_prob.masked_fill(~candidates, 0.0)).sum(dim=1)
    return -pulled / weights.sum(dim=1).clamp_min(1e-12)


def sbcl_loss(
    embeddings: Tensor,
    targets: Tensor,
    subclasses: Tensor,
    views: int,
    temperatures: Tensor,
    temperature: float,
    base_temperature: float,
    class_weight: float,
) -> Tensor:
    """``mean_i [(T / T_base) L_sub(i) + class_weight * L_cls(i)]`` over the ``views * B`` rows.

    ``L_sub``: SupCon with the subclass as the label (positives: the anchor's subclass, the
    softmax over every other row, temperature ``T``); ``L_cls``: :func:`class_level_terms`,
    the anchor's temperature ``targets @ temperatures`` (its class's, for a one-hot target).
    """
    same_subclass = (subclasses.unsqueeze(1) == subclasses.unsqueeze(0)).float()
    sub, _ = supcon_terms(embeddings, same_subclass, temperature)
    per_anchor = targets @ temperatures
    cls = class_level_terms(embeddings, targets @ targets.T, subclasses, views, per_anchor)
    return ((temperature / base_temperature) * sub + class_weight * cls).mean()


@attrs.frozen
class SBCLParams:
    temperature: float = param(
        0.1,
        help="temperature of the subclass term (and of the warm-up SupCon); reference CIFAR: 0.1",
        validator=positive,
    )
    base_temperature: float = param(
        0.07, help="the subclass term is scaled by temperature / base_temperature (reference: 0.07)", validator=positive
    )
    class_weight: float = param(
        0.25, help="weight of the class-level term (the reference's grama, the paper's beta)", validator=non_negative
    )
    adaptive_temperature: bool = param(
        True,
        help="the class-level term's temperature per class from its embeddings' spread (the reference's default); "
        "false: temperature for every class",
    )
    min_cluster_size: int = param(
        10,
        help="subclass size M = max(smallest class count, min_cluster_size); class c gets max(1, n_c // M) subclasses",
        validator=at_least(1),
    )
    cluster_start: int = param(
        10, help="0-based epoch of the first clustering; plain SupCon before it (reference: 10)", validator=non_negative
    )
    cluster_every: int = param(10, help="epochs between two clusterings (reference: 10)", validator=at_least(1))
    kmeans_iterations: int = param(
        35, help="most rounds of each class's k-means (reference: 35)", validator=at_least(1)
    )
    views: int = param(2, help="independently augmented views of each sampled image per step", validator=at_least(2))


class SBCL(ContrastiveLoss):
    """SBCL (Hou et al. 2023): SupCon on k-means subclasses of the head classes, plus a class-level term.

    Stage 1 of a two-stage recipe, like ``supcon``: it trains the representation and no
    classifier (recipes/sbcl.toml, then recipes/sbcl_linear.toml). The subclass labels come
    from the ``subclass-clustering`` callback it brings; without them (before the first
    clustering, or called alone as the conformance kit calls it) it is SupCon on the class
    labels at ``temperature``, unscaled, the reference's warm-up loss.
    """

    name = "sbcl"
    Params = SBCLParams

    def __init__(self, params: Any, context: Any):
        super().__init__(params, context)
        #: This step's subclass of every row (N,), set by the callback; None: no clustering yet.
        self.subclasses: Optional[Tensor] = None
        #: The class-level temperature of every class (C,), set with the subclasses.
        self.temperatures: Optional[Tensor] = None

    def use_subclasses(self, subclasses: Optional[Tensor], temperatures: Optional[Tensor]) -> None:
        """The subclass labels of the next call's rows and the classes' temperatures (None: SupCon)."""
        self.subclasses, self.temperatures = subclasses, temperatures

    def configure_callbacks(self) -> list[Callback]:
        return [SubclassClustering(SubclassClustering.Params(), self.context, self)]

    def __call__(
        self, logits: Tensor, target: Tensor, mixed: Any = None, *, outputs: Optional[Mapping[str, Tensor]] = None
    ) -> Tensor:
        p = self.params
        z, t = self.rows(logits, target, outputs)
        if self.subclasses is None or self.temperatures is None:
            return supcon_loss(z, t, p.temperature, p.temperature)
        if self.subclasses.shape[0] != z.shape[0]:
            raise ValueError(f"sbcl: {self.subclasses.shape[0]} subclass labels for a batch of {z.shape[0]} rows")
        return sbcl_loss(
            z, t, self.subclasses, p.views, self.temperatures, p.temperature, p.base_temperature, p.class_weight
        )


def cluster_seed(seed: int, epoch: int) -> int:
    """The k-means generator's seed: from the run seed and the epoch, apart from the engine's stream."""
    return (seed * 1_000_033 + epoch * 104_729 + 7) % 2**63


@torch.no_grad()
def embed_split(loop: Any, batch_size: int = 512) -> Tensor:
    """The normalised projection (N, D) of every training image, test-time view, eval mode.

    What SBCL clusters: the space the contrastive loss shapes. A model without a projection
    head gives its normalised pooled features.
    """
    module: nn.Module = loop.module
    split = loop.data.train
    was_training = module.training
    module.eval()
    head = getattr(module, "projection", None)
    chunks = []
    indices = torch.arange(len(split))
    for _, x in eval_view_batches(split, indices, loop.device, loop.mean, loop.std, batch_size, loop.memory_format):
        with torch.autocast(
            loop.device.type, dtype=loop.autocast_dtype or torch.float32, enabled=loop.autocast_dtype is not None
        ):
            pooled = module.forward_features(x).mean(dim=(2, 3))
            z = head(pooled) if head is not None else pooled
        chunks.append(F.normalize(z.float(), dim=1))
    module.train(was_training)
    return torch.cat(chunks)


class SubclassClustering(Callback):
    """SBCL's subclasses: re-clusters every class on a schedule and hands the loss each batch's subclass labels (sbcl brings it).

    State (checkpointed): the subclass of every training image, the classes' temperatures
    and the epoch they were computed in, so that a resumed run trains on the same subclasses
    until the next scheduled clustering, and a run resumed inside a clustering epoch does not
    cluster again with the weights of mid-epoch.
    """

    name = "subclass-clustering"

    @attrs.frozen
    class Params:
        pass

    def __init__(self, params: Any, context: Any, loss: SBCL):
        super().__init__(params, context)
        self.loss = loss
        self.labels: Optional[Tensor] = None
        self.temperatures: Optional[Tensor] = None
        self.clustered_epoch = -1

    def due(self, epoch: int) -> bool:
        p = self.loss.params
        return epoch >= p.cluster_start and (epoch - p.cluster_start) % p.cluster_every == 0

    def on_fit_start(self, loop: Any) -> None:
        if not callable(getattr(loop.module, "forward_features", None)):
            raise LSMError(
                f"[loss].name = 'sbcl': model {loop.recipe.model.name!r} has no forward_features, "
                "so its training images cannot be embedded for clustering"
            )
        if self.labels is not None:
            self.labels = self.labels.to(loop.device)
            self.temperatures = self.temperatures.to(loop.device) if self.temperatures is not None else None

    def on_epoch_start(self, loop: Any, epoch: int) -> None:
        if self.due(epoch) and epoch != self.clustered_epoch:
            self.cluster(loop, epoch)
        if self.labels is None:
            self.loss.use_subclasses(None, None)

    def cluster(self, loop: Any, epoch: int) -> None:
        p = self.loss.params
        embeddings = embed_split(loop)
        labels = loop.data.train.labels.to(loop.device)
        clusters = cluster_counts(self.context.class_counts, p.min_cluster_size)
        generator = torch.Generator().manual_seed(cluster_seed(self.context.seed, epoch))
        self.labels = subclass_labels(embeddings, labels, clusters, generator, p.kmeans_iterations)
        self.temperatures = class_temperatures(embeddings, labels, clusters, p.temperature, p.adaptive_temperature)
        self.clustered_epoch = epoch

    def on_batch(self, loop: Any, batch: StepBatch) -> None:
        if self.labels is None:
            return
        if batch.indices is None:
            raise LSMError("[loss].name = 'sbcl': the training step gives no sampled indices (StepBatch.indices)")
        self.loss.use_subclasses(self.labels[batch.indices.to(self.labels.device)], self.temperatures)

    def on_epoch_end(self, loop: Any, epoch: int, record: dict[str, Any]) -> None:
        if self.labels is not None:
            record["sbcl_subclasses"] = int(self.labels.unique().numel())  # fewer than asked if a cluster emptied

    def state_dict(self) -> dict[str, Any]:
        if self.labels is None:
            return {}
        temps = self.temperatures.cpu() if self.temperatures is not None else None
        return {"labels": self.labels.cpu(), "temperatures": temps, "epoch": self.clustered_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.labels, self.temperatures = state["labels"], state["temperatures"]
            self.clustered_epoch = int(state["epoch"])


COMPONENTS = [SBCL]
