"""The cohort trainer: many small networks of one architecture family trained as one computation.

Parameters of P members are stacked along a leading axis and stepped together: one pass of a
kernel (`kernels.py`: batched matmuls for MLPs, `vmap(grad)` for any other architecture) gives
every member's loss and gradients, and the optimizer update is written out on the stacked tensors
with per-member hyperparameters (lr, momentum, betas, weight decay) as [P] tensors. Members of
different widths share a cohort: each is zero-padded to the widest shape and its gradients are
masked, so padded units stay exactly zero and never influence the member's true units.

Each member draws its own batches from its own order seed and sees its own labels (label noise)
and training-set size, so a member trained here ends where the same run trained alone by
`reference.train_reference` ends (up to float rounding).

The trainer writes nothing: it yields a `Checkpoint` (stacked weights on the CPU plus metrics)
at each checkpoint step, and the builder hands those to the store.

A member whose training loss becomes NaN or infinite is frozen from that step on (its weights and
optimizer state stop changing, later checkpoints skip it) and reported in `diverged_step`; the rest
of the cohort trains on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from dlstore.errors import DlstoreError
from dlstore.metrics.basic import dist_from_init, loss_and_accuracy, weight_norm
from dlstore.zoo.kernels import kernel_for
from dlstore.zoo.models import ArchOptions
from dlstore.zoo.schedule import BatchOrder, lr_factor

Params = dict[str, torch.Tensor]


@dataclass
class MemberPlan:
    """One run as the trainer sees it: its start, its data and its optimizer settings."""

    run_id: str
    init: Params
    y_train: torch.Tensor  # [n_train] labels this run trains on (label noise applied)
    order_seed: int
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])


@dataclass
class CohortPlan:
    """Runs that share an architecture family, a dataset, an optimizer kind, a batch size and a
    number of steps: everything that has to be equal for them to step together. `arch` is the
    widest member's architecture; members' `init` tensors carry their own (possibly smaller)
    shapes."""

    arch: ArchOptions
    input_shape: tuple[int, ...]
    n_classes: int
    optimizer: str  # "sgd" | "adam"
    schedule: str
    batch_size: int
    total_steps: int
    checkpoint_steps: list[int]
    x_train: torch.Tensor  # [N, ...] shared inputs; member i uses the first n_train rows
    x_test: torch.Tensor
    y_test: torch.Tensor
    members: list[MemberPlan] = field(default_factory=list)


@dataclass
class Checkpoint:
    step: int
    epoch: torch.Tensor  # [P] float64: step / steps per epoch of each member
    params: Params  # [P, ...] on the CPU, each member at its own shape within the widest
    metrics: dict[str, torch.Tensor]  # name -> [P] float64
    alive: torch.Tensor  # [P] bool: members not diverged before this step


def resolve_device(device: str) -> torch.device:
    """"auto" = cuda when available, else cpu; asking for cuda without one is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DlstoreError(f"device {device!r} asked for, but torch sees no CUDA device "
                           f"(torch {torch.__version__}); use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DlstoreError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def pad_stack(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack tensors of possibly different shapes, each zero-padded at the end of every axis to
    the largest shape. Returns the stack and a 0/1 mask of true entries (None if all equal)."""
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    if all(list(t.shape) == shape for t in tensors):
        return torch.stack(tensors), None
    out = tensors[0].new_zeros((len(tensors), *shape))
    mask = torch.zeros_like(out)
    for i, t in enumerate(tensors):
        region = (i, *(slice(0, n) for n in t.shape))
        out[region] = t
        mask[region] = 1.0
    return out, mask


class CohortTrainer:
    """Trains a `CohortPlan`; `run()` yields a `Checkpoint` at each checkpoint step."""

    def __init__(self, plan: CohortPlan, device: str | torch.device = "cpu",
                 on_step: Callable[[int], None] | None = None, eval_chunk: int = 1024):
        self.plan = plan
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.kernel = kernel_for(plan.arch, plan.input_shape, plan.n_classes)
        self.on_step = on_step
        self.eval_chunk = eval_chunk
        self.diverged_step = torch.full((len(plan.members),), -1, dtype=torch.long)
        self.train_seconds = 0.0

    def run(self) -> Iterator[Checkpoint]:
        plan, dev = self.plan, self.device
        members = plan.members
        n_members = len(members)

        def per_member(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=dev)

        lr = per_member([m.lr for m in members])
        wd = per_member([m.weight_decay for m in members])
        momentum = per_member([m.momentum for m in members])
        beta1 = per_member([m.betas[0] for m in members])
        beta2 = per_member([m.betas[1] for m in members])
        eps = per_member([m.eps for m in members])

        names = list(members[0].init)
        params, masks = {}, {}
        for k in names:
            stacked, mask = pad_stack([m.init[k] for m in members])
            params[k] = stacked.to(dev)
            if mask is not None:
                masks[k] = mask.to(dev)
        init = {k: v.clone() for k, v in params.items()}
        state1 = {k: torch.zeros_like(v) for k, v in params.items()}  # momentum / Adam m
        state2 = {k: torch.zeros_like(v) for k, v in params.items()}  # Adam v

        n_train = torch.tensor([m.n_train for m in members], device=dev)
        y_train = torch.zeros((n_members, int(n_train.max())), dtype=torch.long)
        for i, m in enumerate(members):
            y_train[i, :m.n_train] = m.y_train
        y_train = y_train.to(dev)
        x_train = plan.x_train[:int(n_train.max())].to(dev)
        x_test, y_test = plan.x_test.to(dev), plan.y_test.to(dev)
        sampler = CohortSampler(members, plan.batch_size, dev)

        alive = torch.ones(n_members, dtype=torch.bool, device=dev)
        any_dead = False
        checkpoints = set(plan.checkpoint_steps)

        def col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return v.view(-1, *([1] * (like.dim() - 1)))

        for t in range(plan.total_steps + 1):
            if t in checkpoints:
                yield self._checkpoint(t, sampler.epoch(t), params, init, alive, x_train, y_train,
                                       n_train, x_test, y_test)
            if t == plan.total_steps:
                break
            started = time.perf_counter()
            idx = sampler.batch(t)  # [P, B]
            losses, grads = self.kernel.loss_and_grads(params, x_train[idx],
                                                       y_train.gather(1, idx))
            finite = torch.isfinite(losses)
            if not bool(finite.all()):
                newly = alive & ~finite
                self.diverged_step[newly.cpu()] = t
                alive = alive & finite
                any_dead = True
            step_lr = lr * lr_factor(plan.schedule, t, plan.total_steps)
            with torch.no_grad():
                for k in names:
                    p, g = params[k], grads[k]
                    if k in masks:  # padded entries of narrower members get no gradient
                        g = g * masks[k]
                    g = g + col(wd, p) * p
                    if plan.optimizer == "sgd":
                        buf = g if t == 0 else col(momentum, p) * state1[k] + g
                        new_p = p - col(step_lr, p) * buf
                        new_states = (buf,)
                    else:  # adam, with torch.optim.Adam's arithmetic (L2 added to the gradient)
                        b1, b2 = col(beta1, p), col(beta2, p)
                        m = state1[k] + (1 - b1) * (g - state1[k])
                        v = b2 * state2[k] + (1 - b2) * g * g
                        bc1 = 1 - b1 ** (t + 1)
                        bc2_sqrt = torch.sqrt(1 - b2 ** (t + 1))
                        denom = torch.sqrt(v) / bc2_sqrt + col(eps, p)
                        new_p = p - (col(step_lr, p) / bc1) * (m / denom)
                        new_states = (m, v)
                    if any_dead:  # diverged members keep their weights and optimizer state
                        keep = col(alive, p)
                        new_p = torch.where(keep, new_p, p)
                        new_states = tuple(torch.where(keep, s, old) for s, old in
                                           zip(new_states, (state1[k], state2[k])))
                    params[k] = new_p
                    state1[k] = new_states[0]
                    if len(new_states) == 2:
                        state2[k] = new_states[1]
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            self.train_seconds += time.perf_counter() - started
            if self.on_step is not None:
                self.on_step(t + 1)

    def _checkpoint(self, step, epoch, params, init, alive, x_train, y_train, n_train, x_test,
                    y_test) -> Checkpoint:
        forward = self.kernel.forward_shared
        with torch.no_grad():
            train_loss, train_acc = loss_and_accuracy(forward, params, x_train, y_train,
                                                      n_valid=n_train, chunk=self.eval_chunk)
            test_loss, test_acc = loss_and_accuracy(forward, params, x_test, y_test,
                                                    chunk=self.eval_chunk)
            metrics = {
                "train_loss": train_loss, "train_acc": train_acc,
                "test_loss": test_loss, "test_acc": test_acc,
                "weight_norm": weight_norm(params), "dist_from_init": dist_from_init(params, init),
            }
        return Checkpoint(
            step=step, epoch=epoch,
            params={k: v.detach().to("cpu", copy=True) for k, v in params.items()},
            metrics={k: v.cpu() for k, v in metrics.items()},
            alive=alive.cpu().clone(),
        )


class CohortSampler:
    """Every member's batch indices for a step as one [P, B] tensor. Each member keeps its own
    `BatchOrder` (so its batches are those it would draw alone); permutations are made only at a
    member's epoch boundary and stacked, so a step costs one gather, not P Python calls."""

    def __init__(self, members: list[MemberPlan], batch_size: int, device: torch.device):
        self.orders = [BatchOrder(m.order_seed, m.n_train, batch_size) for m in members]
        self.batch_size = batch_size
        self.device = device
        self.steps_per_epoch = torch.tensor([o.steps_per_epoch for o in self.orders])
        self.uniform = bool((self.steps_per_epoch == self.steps_per_epoch[0]).all())
        width = max(o.n_train for o in self.orders)
        self.perms = torch.zeros((len(members), width), dtype=torch.long)
        self._perms_dev = self.perms.to(device)
        self._offsets = torch.arange(batch_size, device=device)

    def epoch(self, step: int) -> torch.Tensor:
        return step / self.steps_per_epoch.to(torch.float64)

    def batch(self, step: int) -> torch.Tensor:
        within = step % self.steps_per_epoch  # [P] batch index within each member's epoch
        starting = (within == 0).nonzero().flatten().tolist()
        for i in starting:
            perm = self.orders[i].epoch_permutation()
            self.perms[i, :perm.shape[0]] = perm
        if starting:
            self._perms_dev = self.perms.to(self.device, non_blocking=True)
        if self.uniform:
            start = int(within[0]) * self.batch_size
            return self._perms_dev[:, start:start + self.batch_size]
        cols = (within.to(self.device) * self.batch_size)[:, None] + self._offsets
        return self._perms_dev.gather(1, cols)
