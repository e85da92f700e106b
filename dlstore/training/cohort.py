"""The cohort trainer: many small networks of one architecture family trained as one computation.

Parameters of P members are stacked along a leading axis and stepped together: one pass of a
kernel (`kernels.py`: batched matmuls for MLPs, `vmap(grad)` for any other architecture) gives
every member's loss and gradients, and the optimizer update is written out on the stacked tensors
with per-member hyperparameters (lr, momentum, betas, weight decay) as [P] tensors. Members of
different widths share a cohort: each is zero-padded to the widest shape and its gradients are
masked, so padded units stay exactly zero and never influence the member's true units. The same
mask carries a member's pruning mask (lottery tickets): its pruned weights start at zero, get no
gradient, no optimizer state and no weight decay, so they stay exactly zero.

Buffers (the state-dict entries a kernel names in `buffers`: BatchNorm's running statistics,
counters) are stacked and checkpointed with the parameters but never optimized, decayed or
pruned: each step's training forward returns their new values (`loss_grads_and_buffers`), which
replace the old ones for every member still training.

Each member draws its own batches from its own order seed and sees its own labels (label noise)
and training-set size, so a member trained here ends where the same run trained alone by
`reference.train_reference` ends (up to float rounding).

The trainer writes nothing: it yields a `Checkpoint` at each checkpoint step, a snapshot of the
stacked weights (on the training device) whose metrics are computed when first asked for.

A member whose training loss becomes NaN or infinite is frozen from that step on (its weights stop
changing, later checkpoints skip it) and reported in `diverged_step`; the rest of the cohort trains
on.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from dlstore.architectures.kernels import kernel_for
from dlstore.metrics.evaluate import CheckpointEvaluator
from dlstore.metrics.steps import checkpoint_metric_steps
from dlstore.stacks import Params, pad_stack, stack_labels
from dlstore.training.device import resolve_device
from dlstore.training.optim import StackedOptimizer
from dlstore.training.plan import CohortPlan, MemberPlan
from dlstore.training.sampler import CohortSampler
from dlstore.training.schedule import lr_factor

MetricKey = str | tuple[str, str]


@dataclass
class Checkpoint:
    step: int
    epoch: torch.Tensor  # [P] float64: step / steps per epoch of each member
    params: Params  # [P, ...] snapshot on the training device, each member at its own shape
    alive: torch.Tensor  # [P] bool: members not diverged before this step
    evaluator: CheckpointEvaluator

    @functools.cached_property
    def metrics(self) -> dict[MetricKey, torch.Tensor]:
        """[P] float64 on the CPU, computed on first access (on any thread): whole-model metrics
        by name, per-tensor metrics by (name, state-dict name), NaN where a member has no value
        (e.g. `alpha` of a matrix with too few eigenvalues)."""
        return self.evaluator(self.params, self.step)




def shape_groups(members: list[MemberPlan]) -> list[list[int]]:
    """Members with identical true parameter shapes (in cohort order)."""
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(members):
        groups.setdefault(tuple(tuple(v.shape) for v in m.init.values()), []).append(i)
    return list(groups.values())



def batch_labels(y_train: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Each member's labels at its batch indices idx [P, B]: [P, B] from [P, N], or the
    per-position targets [P, B, T] of a sequence task from [P, N, T]."""
    if y_train.dim() == 2:
        return y_train.gather(1, idx)
    return y_train.gather(1, idx.unsqueeze(-1).expand(-1, -1, y_train.shape[2]))


def _write_buffers(params: Params, updated: Params, alive: torch.Tensor, masks: Params) -> None:
    """Buffers after a training forward replace the old ones of members still training (a
    frozen member's stay as they were); padding stays zero."""
    with torch.no_grad():
        for k, new in updated.items():
            if k in masks:
                new = new * masks[k]
            keep = alive.view(-1, *([1] * (new.dim() - 1)))
            params[k].copy_(torch.where(keep, new, params[k]))














class CohortTrainer:
    """Trains a `CohortPlan`; `run()` yields a `Checkpoint` at each checkpoint step."""

    def __init__(self, plan: CohortPlan, device: str | torch.device = "cpu",
                 on_step: Callable[[int], None] | None = None, eval_chunk: int = 256):
        self.plan = plan
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.kernel = kernel_for(plan.arch, plan.input_shape, plan.n_classes)
        self.on_step = on_step
        # examples per evaluation forward: 256 keeps a cohort's activations in a CPU's cache
        # (one train-split evaluation of 33 MLPs: 15 ms at 256, 23 ms at 1,024)
        self.eval_chunk = eval_chunk
        self.diverged_step = torch.full((len(plan.members),), -1, dtype=torch.long)
        self.train_seconds = 0.0

    def run(self) -> Iterator[Checkpoint]:
        plan, dev = self.plan, self.device
        members = plan.members
        n_members = len(members)

        names = list(members[0].init)
        axes = plan.arch.padded_axes({k: tuple(v.shape) for k, v in members[0].init.items()}) or {}
        params, masks = {}, {}
        for k in names:
            stacked, mask = pad_stack([m.init[k] for m in members], axes.get(k, ()))
            if any(m.mask is not None and k in m.mask for m in members):
                # the pruning masks, zero-padded like the weights: one mask for both
                mask = pad_stack([m.mask[k].to(m.init[k].dtype) if m.mask and k in m.mask
                                  else torch.ones_like(m.init[k]) for m in members],
                                 axes.get(k, ()))[0]
                stacked.mul_(mask)
            params[k] = stacked.to(dev)
            if mask is not None:
                masks[k] = mask.to(dev)
        init = {k: v.clone() for k, v in params.items()}
        buffers = tuple(getattr(self.kernel, "buffers", ()))
        pruned = sorted({k for m in members if m.mask for k in m.mask} & set(buffers))
        if pruned:
            raise ValueError(f"pruning masks name buffers {pruned}: only parameters are pruned")
        # the optimizer's view: the same tensors, without the buffers
        trainable = {k: v for k, v in params.items() if k not in buffers}
        optimizer = StackedOptimizer(plan.optimizer, members, dev)

        y_train, n_train = stack_labels([m.y_train[:m.n_train] for m in members])
        y_train, n_train = y_train.to(dev), n_train.to(dev)
        x_train = plan.x_train[:int(n_train.max())].to(dev)
        x_test, y_test = plan.x_test.to(dev), plan.y_test.to(dev)
        sampler = CohortSampler(members, plan.batch_size, dev, plan.start_step)

        alive = torch.ones(n_members, dtype=torch.bool, device=dev)
        checkpoints = set(plan.checkpoint_steps)
        groups = shape_groups(members)
        evaluator = CheckpointEvaluator(
            self.kernel, init, x_train, y_train, n_train, x_test, y_test, self.eval_chunk,
            n_classes=plan.n_classes, shape_groups=groups,
            shapes=[members[g[0]].init for g in groups], masks=masks, options=plan.metrics,
            batch_size=plan.batch_size, entropy_rate=plan.entropy_rate,
            steps={"basic": checkpoints,
                   **checkpoint_metric_steps(plan.metrics, plan.checkpoint_steps)})

        for t in range(plan.start_step, plan.total_steps + 1):
            if t in checkpoints:
                # a snapshot: training goes on in place while the checkpoint is evaluated/stored
                yield Checkpoint(step=t, epoch=sampler.epoch(t),
                                 params={k: v.detach().clone() for k, v in params.items()},
                                 alive=alive.cpu().clone(), evaluator=evaluator)
            if t == plan.total_steps:
                break
            started = time.perf_counter()
            idx = sampler.batch(t)  # [P, B]
            y = batch_labels(y_train, idx)  # [P, B] (or [P, B, T] per-position targets)
            if buffers:
                losses, grads, updated = self.kernel.loss_grads_and_buffers(
                    params, x_train[idx], y)
            else:
                losses, grads = self.kernel.loss_and_grads(params, x_train[idx], y)
            finite = torch.isfinite(losses)
            if not bool(finite.all()):
                self.diverged_step[(alive & ~finite).cpu()] = t
                alive = alive & finite
            if buffers:
                _write_buffers(params, updated, alive, masks)
            optimizer.step(trainable, grads, lr_factor(plan.schedule, t, plan.total_steps),
                           frozen=None if bool(alive.all()) else ~alive, masks=masks)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            self.train_seconds += time.perf_counter() - started
            if self.on_step is not None:
                self.on_step(t + 1)





