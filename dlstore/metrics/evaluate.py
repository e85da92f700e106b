"""Checkpoint metrics of a cohort: `CheckpointEvaluator` runs every metric family the spec
selects at a step over the stacked parameters [P, ...], and `metric_columns` turns its values
into rows of the `metrics` table. The build and `dlstore metrics compute` (backfill) both use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dlstore.metrics.basic import dist_from_init, loss_and_accuracy, weight_norm
from dlstore.metrics.families import MetricKey, MetricsOptions
from dlstore.stacks import Params, member_slices


@dataclass
class CheckpointEvaluator:
    """The metrics of a checkpoint snapshot, for the families the spec selects at its step
    (`steps`: family -> steps; "basic" = losses and accuracies on the full splits, each member
    on its own training subset and labels, weight norm and distance from init; for sequence
    tasks per marked token, with the tokens seen and the excess over a known entropy rate).

    Per-tensor metrics are computed per shape group (members of identical true shapes), on each
    member's true slice of the padded stack, so that padding never counts. Buffers (the
    kernel's `buffers`: running statistics, counters) are state, not weights: the weight norm,
    the distance from init and the per-tensor metrics leave them out."""

    kernel: object
    init: Params
    x_train: torch.Tensor
    y_train: torch.Tensor  # [P, n] per-member labels
    n_train: torch.Tensor  # [P]
    x_test: torch.Tensor
    y_test: torch.Tensor
    chunk: int
    n_classes: int
    shape_groups: list[list[int]]  # member indices with identical true shapes
    shapes: list[Params]  # per group, tensors of the true shapes (a member's init)
    masks: Params  # 1 on true entries of padded tensors (absent: no padding)
    options: MetricsOptions
    steps: dict[str, set[int]]
    member_chunk: int = 256  # members per Hessian / collapse computation (bounds memory)
    batch_size: int | None = None  # examples a training step sees (tokens seen), if known
    entropy_rate: float | None = None  # nats per token of a sequence task's source, if known
    _cache: dict = field(default_factory=dict, repr=False)

    def __call__(self, params: Params, step: int) -> dict[MetricKey, torch.Tensor]:
        metrics: dict[MetricKey, torch.Tensor] = {}
        selected = [f for name, f in self.options.families if step in self.steps.get(name, ())]
        with torch.no_grad():
            if step in self.steps.get("basic", ()):
                metrics.update(self._basic(params, step))
            for family in selected:
                if not family.needs_grad:
                    metrics.update(family.compute(self, params, step))
        for family in selected:  # the Hessian differentiates twice: autograd on
            if family.needs_grad:
                metrics.update(family.compute(self, params, step))
        return {k: v.cpu() for k, v in metrics.items()}

    def _basic(self, params: Params, step: int) -> dict[MetricKey, torch.Tensor]:
        forward = self.kernel.forward_shared
        train_loss, train_acc = loss_and_accuracy(forward, params, self.x_train, self.y_train,
                                                  n_valid=self.n_train, chunk=self.chunk)
        test_loss, test_acc = loss_and_accuracy(forward, params, self.x_test, self.y_test,
                                                chunk=self.chunk)
        return {"train_loss": train_loss, "train_acc": train_acc,
                "test_loss": test_loss, "test_acc": test_acc,
                "weight_norm": weight_norm(self.weights(params)),
                "dist_from_init": dist_from_init(self.weights(params), self.init),
                **self._sequence(train_loss, test_loss, step)}

    def _sequence(self, train_loss: torch.Tensor, test_loss: torch.Tensor, step: int
                  ) -> dict[MetricKey, torch.Tensor]:
        """Of a sequence task: the tokens a member has trained on (inputs, `tokens_seen`) and,
        where the source's entropy rate is known, each loss's excess over it."""
        out: dict[MetricKey, torch.Tensor] = {}
        if self.y_train.dim() == 3 and self.batch_size is not None:
            tokens = float(step * self.batch_size * self.x_train.shape[1])
            out["tokens_seen"] = torch.full_like(train_loss, tokens)
        if self.entropy_rate is not None:
            out["train_excess_loss"] = train_loss - self.entropy_rate
            out["test_excess_loss"] = test_loss - self.entropy_rate
        return out

    def weights(self, params: Params) -> Params:
        """The trainable tensors of `params`, without the kernel's buffers."""
        buffers = getattr(self.kernel, "buffers", ())
        return {k: v for k, v in params.items() if k not in buffers} if buffers else params

    # What metric families compute with (`dlstore.MetricFamily.compute`):

    def cached(self, key, make: Callable[[], object]):
        """`make()`, computed once per cohort (a family's fixed inputs)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def per_tensor(self, params: Params, compute: Callable[[torch.Tensor], dict]
                   ) -> dict[MetricKey, torch.Tensor]:
        """{(value, tensor): [P]} from `compute(stack)` -> {value: [members]} over each tensor's
        stack of members with identical true shapes, cut to those shapes (padding never counts)."""
        out: dict[MetricKey, torch.Tensor] = {}
        n_members = next(iter(params.values())).shape[0]
        for members, shapes in zip(self.shape_groups, self.shapes):
            index = torch.tensor(members, device=next(iter(params.values())).device)
            for name, stack in member_slices(self.weights(params), shapes, members).items():
                for metric, value in compute(stack).items():
                    column = out.setdefault((metric, name), torch.full(
                        (n_members,), torch.nan, dtype=torch.float64, device=value.device))
                    column[index] = value
        return out

    def training_sample(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first `size` training examples (a fixed subsample), each member's own labels,
        and weights that leave out examples beyond a member's training set."""
        size = min(size, self.x_train.shape[0])
        weight = (torch.arange(size, device=self.x_train.device)[None, :]
                  < self.n_train[:, None]).to(torch.float32)
        return self.x_train[:size], self.y_train[:, :size], weight

    def chunked(self, compute, params: Params) -> dict[MetricKey, torch.Tensor]:
        """`compute(params of a chunk of members, their slice)` over chunks of `member_chunk`
        members (bounds memory), concatenated."""
        n_members = next(iter(params.values())).shape[0]
        parts = [compute({k: v[s:s + self.member_chunk] for k, v in params.items()},
                         slice(s, s + self.member_chunk))
                 for s in range(0, n_members, self.member_chunk)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def empty_metric_columns() -> dict[str, list]:
    return {k: [] for k in ("run_id", "step", "metric", "tensor", "value")}


def metric_columns(values: dict, step: int, ids: list[str], members: list[int]
                   ) -> dict[str, list]:
    """Metric rows of `members` (positions in the stack; `ids` their run ids) at `step`, as
    columns, from an evaluator's [P] values; per-tensor metrics carry the state-dict name in
    `tensor`. A NaN value means the metric is undefined for that member (e.g. `alpha`
    of a matrix with fewer than 8 eigenvalues): it gets no row."""
    metrics = empty_metric_columns()
    for key, column in values.items():
        name, tensor = key if isinstance(key, tuple) else (key, None)
        picked = column[members]
        keep = ~torch.isnan(picked)
        kept = [i for i, k in zip(ids, keep.tolist()) if k] if not bool(keep.all()) else ids
        metrics["run_id"] += kept
        metrics["step"] += [step] * len(kept)
        metrics["metric"] += [name] * len(kept)
        metrics["tensor"] += [tensor] * len(kept)
        metrics["value"] += picked[keep].tolist()
    return metrics
