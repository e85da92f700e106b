"""The cohort trainer: many small networks of one architecture shape trained as one computation.

Parameters of P members are stacked along a leading axis and stepped together: the forward and
backward pass is `torch.func.vmap(grad(loss))` over `functional_call` of one template module, and
the optimizer update is written out on the stacked tensors with per-member hyperparameters
(lr, momentum, betas, weight decay) as [P] tensors. Each member draws its own batches from its own
order seed and sees its own labels (label noise) and training-set size, so a member trained here
ends where the same run trained alone by `reference.train_reference` ends (up to float rounding).

The trainer writes nothing: it yields a `Checkpoint` (stacked weights on the CPU plus metrics)
at each checkpoint step, and the builder hands those to the store.

A member whose training loss becomes NaN or infinite is frozen from that step on (its weights and
optimizer state stop changing, later checkpoints skip it) and reported in `diverged_step`; the rest
of the cohort trains on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from dlstore.errors import DlstoreError
from dlstore.metrics.basic import dist_from_init, loss_and_accuracy, weight_norm
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
    """Runs that share an architecture shape, a dataset, an optimizer kind, a batch size and a
    number of steps: everything that has to be equal for them to step together."""

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
    params: Params  # [P, ...] on the CPU
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


class CohortTrainer:
    def __init__(self, plan: CohortPlan, device: str | torch.device = "cpu"):
        self.plan = plan
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.diverged_step = torch.full((len(plan.members),), -1, dtype=torch.long)
        self.train_seconds = 0.0
        with torch.device("meta"):
            self._template = plan.arch.build(plan.input_shape, plan.n_classes)

    def _forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self._template, params, (x,))

    def _loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._forward(params, x), y)

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
        params = {k: torch.stack([m.init[k] for m in members]).to(dev) for k in names}
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
        orders = [BatchOrder(m.order_seed, m.n_train, plan.batch_size) for m in members]
        steps_per_epoch = torch.tensor([o.steps_per_epoch for o in orders], dtype=torch.float64)

        step_fn = vmap(grad_and_value(self._loss))
        eval_forward = vmap(self._forward, in_dims=(0, None))
        alive = torch.ones(n_members, dtype=torch.bool, device=dev)
        checkpoints = set(plan.checkpoint_steps)

        def expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return v.view(-1, *([1] * (like.dim() - 1)))

        for t in range(plan.total_steps + 1):
            if t in checkpoints:
                yield self._checkpoint(t, t / steps_per_epoch, params, init, alive, eval_forward,
                                       x_train, y_train, n_train, x_test, y_test)
            if t == plan.total_steps:
                break
            started = time.perf_counter()
            idx = torch.stack([o.batch(t) for o in orders]).to(dev)  # [P, B]
            grads, losses = step_fn(params, x_train[idx], y_train.gather(1, idx))
            finite = torch.isfinite(losses)
            newly = alive & ~finite
            if bool(newly.any()):
                self.diverged_step[newly.cpu()] = t
                alive = alive & finite
            step_lr = lr * lr_factor(plan.schedule, t, plan.total_steps)
            with torch.no_grad():
                for k in names:
                    p, g = params[k], grads[k]
                    keep = expand(alive, p)
                    g = g + expand(wd, p) * p
                    if plan.optimizer == "sgd":
                        buf = g if t == 0 else expand(momentum, p) * state1[k] + g
                        new_p = p - expand(step_lr, p) * buf
                        state1[k] = torch.where(keep, buf, state1[k])
                    else:  # adam, with torch.optim.Adam's arithmetic (L2 added to the gradient)
                        b1, b2 = expand(beta1, p), expand(beta2, p)
                        m = state1[k] + (1 - b1) * (g - state1[k])
                        v = b2 * state2[k] + (1 - b2) * g * g
                        bc1 = 1 - b1 ** (t + 1)
                        bc2_sqrt = torch.sqrt(1 - b2 ** (t + 1))
                        denom = torch.sqrt(v) / bc2_sqrt + expand(eps, p)
                        new_p = p - (expand(step_lr, p) / bc1) * (m / denom)
                        state1[k] = torch.where(keep, m, state1[k])
                        state2[k] = torch.where(keep, v, state2[k])
                    params[k] = torch.where(keep, new_p, p)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            self.train_seconds += time.perf_counter() - started

    def _checkpoint(self, step, epoch, params, init, alive, eval_forward, x_train, y_train,
                    n_train, x_test, y_test) -> Checkpoint:
        with torch.no_grad():
            train_loss, train_acc = loss_and_accuracy(eval_forward, params, x_train, y_train,
                                                      n_valid=n_train)
            test_loss, test_acc = loss_and_accuracy(eval_forward, params, x_test, y_test)
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
