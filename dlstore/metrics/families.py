"""Metric families: what a spec's `[metrics]` table selects, and how each is computed.

A family is a subclass of `dlstore.MetricFamily`: a pydantic model of its options (`at`, the
checkpoints it runs at, plus its own), the names of the values it returns, and `compute`, a
function of a cohort's stacked parameters at one checkpoint. The built-ins below are registered
by name with `@register_family`; a plugin's family is named in `[metrics]` by its entry point
(group `dlstore.metrics`) or by import path (a key containing ':'). The spec's validation, the
build's checkpoint evaluation (`population.CheckpointEvaluator`) and `dlstore metrics compute`
(`backfill`) all read this one registry, so adding a family is one class.

`groups` (barriers, mode connectivity, CKA and disagreement between seeds) and `curve` (the same
along a trained curve) are no checkpoint families: they are computed after a build, from the
store, over pairs of runs, and stay their own keys.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dlstore import plugins
from dlstore.errors import SpecError, format_validation_error
from dlstore.metrics.collapse import COLLAPSE
from dlstore.metrics.spectra import SPECTRA
from dlstore.metrics.weights import STATISTICS

CheckpointSelection = Literal["all", "last"] | list[Annotated[int, Field(ge=0)]]
MetricKey = str | tuple[str, str]


class MetricFamily(BaseModel):
    """A family of checkpoint metrics and its options, validated like a spec's other tables
    (unknown fields refused). Subclasses set `values` and implement `compute`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    at: CheckpointSelection = Field(
        default="last", description="checkpoints to compute at: all, last, or a list of steps "
        "(each a checkpoint step of every run)")

    # Declared (class attributes, no options of a spec):
    # - the names of the values `compute` returns; the first (or `marker`) marks the family as
    #   recorded at a (run, step), so that backfill computes only what is missing
    values: ClassVar[tuple[str, ...]] = ()
    marker: ClassVar[str | None] = None
    # - values per tensor: keys (value name, state-dict name) instead of value names
    per_tensor: ClassVar[bool] = False
    # - selected unless the spec says `false`
    on_by_default: ClassVar[bool] = False
    # - the spec may write `family = "all" | "last" | [steps]` for `{ at = ... }`
    shorthand: ClassVar[bool] = False
    # - architecture properties it needs (`Architecture.require`): refused before training
    needs: ClassVar[tuple[str, ...]] = ()
    # - computed with autograd enabled (everything else runs under no_grad)
    needs_grad: ClassVar[bool] = False

    def compute(self, cohort, params: dict[str, torch.Tensor], step: int
                ) -> dict[MetricKey, torch.Tensor]:
        """{value name: [P] float64} for the P members of `params` ([P, ...] stacks, padded to
        the widest member). `cohort` is the `CheckpointEvaluator`: its kernel (forward_shared,
        forward_one, features_shared), data (x_train, y_train [P, n], n_train, x_test, y_test,
        n_classes) and helpers (training_sample, chunked, per_tensor, cached)."""
        raise NotImplementedError

    @classmethod
    def marker_name(cls) -> str:
        return cls.marker or cls.values[0]


METRIC_FAMILIES: dict[str, type[MetricFamily]] = {}


register_family = plugins.registrar(METRIC_FAMILIES, "metric family")


class _CheapPerTensor(MetricFamily):
    """Per-tensor values, cheap enough to be on at every checkpoint unless turned off."""

    at: CheckpointSelection = "all"
    per_tensor: ClassVar[bool] = True
    on_by_default: ClassVar[bool] = True
    shorthand: ClassVar[bool] = True


@register_family("statistics")
class Statistics(_CheapPerTensor):
    """Per-tensor mean, std and quantiles."""

    values: ClassVar[tuple[str, ...]] = STATISTICS
    marker: ClassVar[str] = "mean"

    def compute(self, cohort, params, step):
        from dlstore.metrics.weights import tensor_statistics

        return cohort.per_tensor(params, tensor_statistics)


@register_family("spectra")
class Spectra(_CheapPerTensor):
    """Per weight matrix norms, ranks and power-law alpha."""

    values: ClassVar[tuple[str, ...]] = SPECTRA
    marker: ClassVar[str] = "spectral_norm"

    def compute(self, cohort, params, step):
        from dlstore.metrics.spectra import is_weight_matrix, spectral_metrics

        return cohort.per_tensor(params, lambda stack: spectral_metrics(stack)
                                 if is_weight_matrix(stack) else {})


@register_family("hessian")
class HessianOptions(MetricFamily):
    """Top eigenvalue (block LOBPCG) and trace (Hutchinson) of each member's loss Hessian."""

    subsample: int = Field(default=512, ge=1, description="first n training examples of each "
                           "member (its own labels)")
    iterations: int = Field(default=100, ge=1, description="most iterations of the top-eigenvalue "
                            "search (block LOBPCG: each costs a few Hessian-vector products)")
    tolerance: float = Field(default=1e-3, gt=0, description="residual bound that stops it: "
                             "||Hv - lambda v|| <= tolerance |lambda| for every vector of the "
                             "block, so an eigenvalue lies within tolerance |lambda| of the value")
    probes: int = Field(default=10, ge=1, description="Rademacher probes of the Hutchinson trace")
    values: ClassVar[tuple[str, ...]] = ("hessian_top_eig", "hessian_trace")
    needs_grad: ClassVar[bool] = True

    def compute(self, cohort, params, step):
        return cohort.chunked(functools.partial(self._one_chunk, cohort, seed=step), params)

    def _one_chunk(self, cohort, params, members: slice, seed: int):
        from dlstore.metrics.hessian import hessian_spectrum

        x, y, weight = cohort.training_sample(self.subsample)
        forward_one = cohort.kernel.forward_one

        def loss_one(p, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
            return (F.cross_entropy(forward_one(p, x), y, reduction="none") * w).sum() / w.sum()

        masks = {k: m[members] for k, m in cohort.masks.items()}
        # the Hessian of the parameters; buffers (running statistics) are held where they are
        weights = cohort.weights(params)
        fixed = {k: v for k, v in params.items() if k not in weights}
        return hessian_spectrum(loss_one, weights, x, y[members], weight[members],
                                iterations=self.iterations, tolerance=self.tolerance,
                                probes=self.probes, masks=masks, seed=seed, fixed=fixed)


@register_family("neural_collapse")
class CollapseOptions(MetricFamily):
    """Neural collapse NC1-NC4 of the penultimate features on a training subsample."""

    subsample: int = Field(default=2048, ge=1, description="first n training examples of each "
                           "member (its own labels)")
    values: ClassVar[tuple[str, ...]] = COLLAPSE
    marker: ClassVar[str] = "nc1"
    needs: ClassVar[tuple[str, ...]] = ("features_method", "classifier_layer")

    def compute(self, cohort, params, step):
        return cohort.chunked(functools.partial(self._one_chunk, cohort), params)

    def _one_chunk(self, cohort, params, members: slice):
        from dlstore.metrics.collapse import neural_collapse

        x, y, weight = cohort.training_sample(self.subsample)
        head = cohort.kernel.classifier
        return neural_collapse(cohort.kernel.features_shared(params, x), y[members],
                               params[f"{head}.weight"], params[f"{head}.bias"],
                               cohort.n_classes, weight=weight[members])


@register_family("gaussian_clone")
class CloneOptions(MetricFamily):
    """Loss and accuracy on a Gaussian clone of the test split (each class resampled from its
    mean and covariance)."""

    at: CheckpointSelection = Field(
        default="all", description="checkpoints to compute at (cheap: one pass over a "
        "test-sized set)")
    seed: int = Field(default=0, description="draws the clone; the same for every run of a "
                      "dataset, so runs are compared on one clone")
    values: ClassVar[tuple[str, ...]] = ("clone_loss", "clone_acc")

    def compute(self, cohort, params, step):
        from dlstore.datasets.base import gaussian_clone
        from dlstore.metrics.basic import loss_and_accuracy

        # drawn once per cohort
        clone = cohort.cached(("gaussian_clone", self.seed), lambda: gaussian_clone(
            cohort.x_test, cohort.y_test, cohort.n_classes, self.seed))
        loss, acc = loss_and_accuracy(cohort.kernel.forward_shared, params, clone,
                                      cohort.y_test, chunk=cohort.chunk)
        return {"clone_loss": loss, "clone_acc": acc}


class GroupOptions(BaseModel):
    """Over the seeds of each config: barriers, mode connectivity, CKA, disagreement (computed
    after the build, from the store)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    at: CheckpointSelection = Field(
        default="last", description="checkpoints to compute at: all, last, or a list of steps "
        "(each a checkpoint step of every run)")
    points: int = Field(default=11, ge=2, description="points on the line between two members")
    pairs: int = Field(default=10, ge=1, description="most pairs of seeds per group")
    subsample: int = Field(default=4096, ge=1, description="first n training examples for the "
                           "train-split barriers")


class CurveOptions(GroupOptions):
    """Over the seeds of each config: barriers and mode connectivity along a trained quadratic
    Bezier curve between two seeds (computed after the build, from the store). The optimizer
    settings default to Garipov et al.'s (`train.py`: SGD, lr 0.01, momentum 0.9, weight decay
    1e-4 on the curve's point, batch 128, their schedule); the number of steps is this
    project's choice. `at` and `pairs` as for the straight line."""

    points: int = Field(default=11, ge=2, description="evenly spaced points on the curve")
    subsample: int = Field(default=4096, ge=1, description="first n training examples for the "
                           "train-split barriers and the BatchNorm statistics")
    steps: int = Field(default=2000, ge=0, description="training steps of each curve's bend")
    batch_size: int = Field(default=128, ge=1, description="training examples per step")
    lr: float = Field(default=0.01, gt=0, description="SGD learning rate of the bend (Garipov "
                      "et al.'s schedule scales it)")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(default=1e-4, ge=0, description="L2 of the curve's point "
                                "(0.5 wd ||theta(t)||^2 added to the loss)")
    seed: int = Field(default=0, description="with the pair's run ids, seeds its t and batches")


class MetricsOptions:
    """What is measured, chosen per zoo: the selected families, each with its options, and the
    group metrics. Not part of any run id (metrics never change weights), so adding a metric to a
    built spec renames nothing; runs already in a store keep the metrics they were built with
    until `dlstore metrics compute SPEC` adds the missing ones.

    Each key of `[metrics]` names a family (a built-in, an entry point, or an import path with
    ':'); its value is true (defaults), false (off) or a table of options, and for the cheap
    families (`statistics`, `spectra`, on unless turned off) a checkpoint selection. The costly
    ones are off unless given."""

    def __init__(self, table: dict[str, Any] | None = None, /, **given: Any):
        from dlstore import plugins

        table = {**(table or {}), **given}
        if not isinstance(table, dict):
            raise SpecError(f"metrics: expected a table, got {type(table).__name__}")
        chosen: dict[str, MetricFamily | None] = {}
        self.groups: GroupOptions | None = None
        self.curve: CurveOptions | None = None
        for key, value in table.items():
            field = f"metrics.{key}"
            if key == "groups":
                self.groups = _options(GroupOptions, value, field, shorthand=False)
                continue
            if key == "curve":
                self.curve = _options(CurveOptions, value, field, shorthand=False)
                continue
            cls = plugins.resolve("metric family", key, METRIC_FAMILIES, MetricFamily, field)
            chosen[key] = _options(cls, value, field, cls.shorthand)
        for key, cls in METRIC_FAMILIES.items():
            if key not in chosen and cls.on_by_default:
                chosen[key] = cls()
        # built-ins in registry order (the order they were always computed in), then the rest
        order = [k for k in METRIC_FAMILIES if k in chosen] + [k for k in chosen
                                                              if k not in METRIC_FAMILIES]
        self.families: tuple[tuple[str, MetricFamily], ...] = tuple(
            (k, chosen[k]) for k in order if chosen[k] is not None)

    def get(self, name: str) -> MetricFamily | None:
        """The selected family of that name (as the spec spells it), or None."""
        return dict(self.families).get(name)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, MetricsOptions) and self.families == other.families
                and self.groups == other.groups and self.curve == other.curve)

    def __hash__(self) -> int:
        return hash((self.families, self.groups, self.curve))

    def __repr__(self) -> str:
        return (f"MetricsOptions(families={dict(self.families)!r}, groups={self.groups!r}, "
                f"curve={self.curve!r})")


def _options(cls: type[BaseModel], value: Any, field: str, shorthand: bool):
    """A family's options from its `[metrics]` value; None = not selected."""
    if value is True:
        value = {}
    if value is False or value is None:
        return None
    if isinstance(value, cls):
        return value
    if shorthand and isinstance(value, (str, list)):
        value = {"at": value}
    if not isinstance(value, dict):
        raise SpecError(f"{field}: expected true, false or a table of options"
                        + (", or a checkpoint selection" if shorthand else "")
                        + f", got {value!r}")
    try:
        return cls.model_validate(value)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, field)) from None
