"""The cohort trainer: many small networks of one architecture family trained as one computation.

Parameters of P members are stacked along a leading axis and stepped together: one pass of a
kernel (`kernels.py`: batched matmuls for MLPs, `vmap(grad)` for any other architecture) gives
every member's loss and gradients, and the optimizer update is written out on the stacked tensors
with per-member hyperparameters (lr, momentum, betas, weight decay) as [P] tensors. Members of
different widths share a cohort: each is zero-padded to the widest shape and its gradients are
masked, so padded units stay exactly zero and never influence the member's true units. The same
mask carries a member's pruning mask (lottery tickets): its pruned weights start at zero, get no
gradient, no optimizer state and no weight decay, so they stay exactly zero.

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
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from dlstore.errors import DlstoreError
from dlstore.metrics.basic import dist_from_init, loss_and_accuracy, weight_norm
from dlstore.zoo.kernels import kernel_for
from dlstore.zoo.models import Architecture
from dlstore.zoo.schedule import BatchOrder, lr_factor
from dlstore.zoo.spec import MetricsOptions, checkpoint_metric_steps

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
    mask: dict[str, torch.Tensor] | None = None  # pruning mask (bool, True = kept), by tensor

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])


@dataclass
class CohortPlan:
    """Runs that share an architecture family, a dataset, an optimizer kind, a batch size and a
    number of steps: everything that has to be equal for them to step together. `arch` is the
    widest member's architecture; members' `init` tensors carry their own (possibly smaller)
    shapes."""

    arch: Architecture
    input_shape: tuple[int, ...]
    n_classes: int
    optimizer: str  # "sgd" | "adam" | "adamw"
    schedule: str
    batch_size: int
    total_steps: int
    checkpoint_steps: list[int]
    x_train: torch.Tensor  # [N, ...] shared inputs; member i uses the first n_train rows
    x_test: torch.Tensor
    y_test: torch.Tensor
    members: list[MemberPlan] = field(default_factory=list)
    start_step: int = 0  # rewound tickets resume the schedule and data order here
    metrics: MetricsOptions = field(default_factory=MetricsOptions)


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


@dataclass
class CheckpointEvaluator:
    """The metrics of a checkpoint snapshot, for the families the spec selects at its step
    (`steps`: family -> steps; "basic" = losses and accuracies on the full splits, each member
    on its own training subset and labels, weight norm and distance from init).

    Per-tensor metrics are computed per shape group (members of identical true shapes), on each
    member's true slice of the padded stack, so that padding never counts."""

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
    _cache: dict = field(default_factory=dict, repr=False)

    def __call__(self, params: Params, step: int) -> dict[MetricKey, torch.Tensor]:
        metrics: dict[MetricKey, torch.Tensor] = {}
        selected = [f for name, f in self.options.families if step in self.steps.get(name, ())]
        with torch.no_grad():
            if step in self.steps.get("basic", ()):
                metrics.update(self._basic(params))
            for family in selected:
                if not family.needs_grad:
                    metrics.update(family.compute(self, params, step))
        for family in selected:  # the Hessian differentiates twice: autograd on
            if family.needs_grad:
                metrics.update(family.compute(self, params, step))
        return {k: v.cpu() for k, v in metrics.items()}

    def _basic(self, params: Params) -> dict[MetricKey, torch.Tensor]:
        forward = self.kernel.forward_shared
        train_loss, train_acc = loss_and_accuracy(forward, params, self.x_train, self.y_train,
                                                  n_valid=self.n_train, chunk=self.chunk)
        test_loss, test_acc = loss_and_accuracy(forward, params, self.x_test, self.y_test,
                                                chunk=self.chunk)
        return {"train_loss": train_loss, "train_acc": train_acc,
                "test_loss": test_loss, "test_acc": test_acc,
                "weight_norm": weight_norm(params),
                "dist_from_init": dist_from_init(params, self.init)}

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
            for name, stack in member_slices(params, shapes, members).items():
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


def shape_groups(members: list[MemberPlan]) -> list[list[int]]:
    """Members with identical true parameter shapes (in cohort order)."""
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(members):
        groups.setdefault(tuple(tuple(v.shape) for v in m.init.values()), []).append(i)
    return list(groups.values())


def member_slices(params: Params, shapes: Params, members: list[int]) -> Params:
    """The stacks [len(members), ...] of `members`, each tensor cut to the true shapes of
    `shapes` (from a padded cohort stack)."""
    index = torch.tensor(members, device=next(iter(params.values())).device)
    return {k: v.index_select(0, index)[(slice(None), *(slice(0, n) for n in shapes[k].shape))]
            .contiguous() for k, v in params.items()}


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


# A CPU step is fastest when a cohort's activations stay in cache: measured on a 2-core AVX-512
# machine, 32-256 members of a 2.7k-23k-parameter MLP ran 1.3-2x faster per model-step than 512-
# 1024 (bench/train_throughput.py --members). A GPU wants every member it can hold.
CPU_ACTIVATION_BUDGET = 8 * 2**20
CPU_MAX_COHORT = 1024
GPU_MEMORY_FRACTION = 0.4
GPU_MAX_COHORT = 65536


def member_memory(n_params: int, activation_units: int, batch_size: int) -> int:
    """Bytes one cohort member needs while training: float32 parameters, gradients, initial
    weights, two optimizer states and a mask (6 copies), and one batch's activations, their
    gradients and pre-activations (3 copies)."""
    return 4 * 6 * n_params + 4 * 3 * batch_size * activation_units


def auto_cohort_size(n_params: int, activation_units: int, batch_size: int,
                     device: torch.device) -> int:
    """Members per cohort for a network of `n_params` parameters and `activation_units` numbers
    of activations per example: from cache size on a CPU, from free memory on a GPU, and never
    more than half the free RAM."""
    step_bytes = 4 * 3 * batch_size * activation_units  # activations, their grads, pre-activations
    member_bytes = member_memory(n_params, activation_units, batch_size)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(max(1, min(GPU_MAX_COHORT, GPU_MEMORY_FRACTION * free // member_bytes)))
    free_ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    by_cache = CPU_ACTIVATION_BUDGET // step_bytes
    by_ram = free_ram // 2 // member_bytes
    return int(max(1, min(CPU_MAX_COHORT, max(16, by_cache), by_ram)))


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
        params, masks = {}, {}
        for k in names:
            stacked, mask = pad_stack([m.init[k] for m in members])
            if any(m.mask is not None and k in m.mask for m in members):
                # the pruning masks, zero-padded like the weights: one mask for both
                mask = pad_stack([m.mask[k].to(m.init[k].dtype) if m.mask and k in m.mask
                                  else torch.ones_like(m.init[k]) for m in members])[0]
                stacked.mul_(mask)
            params[k] = stacked.to(dev)
            if mask is not None:
                masks[k] = mask.to(dev)
        init = {k: v.clone() for k, v in params.items()}
        optimizer = StackedOptimizer(plan.optimizer, members, dev)

        n_train = torch.tensor([m.n_train for m in members], device=dev)
        y_train = torch.zeros((n_members, int(n_train.max())), dtype=torch.long)
        for i, m in enumerate(members):
            y_train[i, :m.n_train] = m.y_train
        y_train = y_train.to(dev)
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
            losses, grads = self.kernel.loss_and_grads(params, x_train[idx],
                                                       y_train.gather(1, idx))
            finite = torch.isfinite(losses)
            if not bool(finite.all()):
                self.diverged_step[(alive & ~finite).cpu()] = t
                alive = alive & finite
            optimizer.step(params, grads, lr_factor(plan.schedule, t, plan.total_steps),
                           frozen=None if bool(alive.all()) else ~alive, masks=masks)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            self.train_seconds += time.perf_counter() - started
            if self.on_step is not None:
                self.on_step(t + 1)



class StackedOptimizer:
    """torch.optim.SGD (momentum, L2 weight decay), torch.optim.Adam and torch.optim.AdamW
    (decoupled weight decay), written in place on
    stacked parameters with per-member hyperparameters as [P] columns.

    In place, because at zoo sizes the update is bound by memory traffic, not arithmetic. Frozen
    (diverged) members get a zero gradient and a zero learning rate, so their weights stay as they
    were even when their gradients are NaN."""

    def __init__(self, kind: str, members: list[MemberPlan], device: torch.device):
        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        self.kind = kind
        self.lr = column([m.lr for m in members])
        self.weight_decay = column([m.weight_decay for m in members])
        self.use_weight_decay = any(m.weight_decay for m in members)
        self.momentum = column([m.momentum for m in members])
        self.use_momentum = any(m.momentum for m in members)
        self.beta1 = column([m.betas[0] for m in members])
        self.beta2 = column([m.betas[1] for m in members])
        self.eps = column([m.eps for m in members])
        self.state1: dict[str, torch.Tensor] = {}  # momentum buffer / Adam first moment
        self.state2: dict[str, torch.Tensor] = {}  # Adam second moment
        self.t = 0

    def step(self, params: Params, grads: Params, lr_scale: float,
             frozen: torch.Tensor | None = None, masks: Params | None = None) -> None:
        lr = self.lr * lr_scale
        if frozen is not None:
            lr = lr.masked_fill(frozen, 0.0)
        self.t += 1
        with torch.no_grad():
            for k, p in params.items():
                g = grads[k]
                shape = (-1, *([1] * (p.dim() - 1)))
                if frozen is not None:
                    g.masked_fill_(frozen.view(shape), 0.0)
                if masks and k in masks:  # padded and pruned entries get no gradient
                    g.mul_(masks[k])
                if self.use_weight_decay and self.kind == "adamw":
                    p.mul_(1.0 - lr.view(shape) * self.weight_decay.view(shape))
                elif self.use_weight_decay:
                    g.addcmul_(p, self.weight_decay.view(shape))
                if self.kind == "sgd":
                    if self.use_momentum:
                        if k not in self.state1:
                            self.state1[k] = g.clone()
                        else:
                            self.state1[k].mul_(self.momentum.view(shape)).add_(g)
                        g = self.state1[k]
                    p.addcmul_(g, lr.view(shape), value=-1.0)
                else:
                    self._adam(k, p, g, lr.view(shape), shape)

    def _adam(self, k: str, p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor, shape) -> None:
        b1, b2 = self.beta1.view(shape), self.beta2.view(shape)
        if k not in self.state1:
            self.state1[k] = torch.zeros_like(p)
            self.state2[k] = torch.zeros_like(p)
        m, v = self.state1[k], self.state2[k]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g * g, 1 - b2)
        bias1 = 1 - b1**self.t
        bias2_sqrt = torch.sqrt(1 - b2**self.t)
        denom = (v.sqrt() / bias2_sqrt).add_(self.eps.view(shape))
        p.addcmul_(m / denom, lr / bias1, value=-1.0)


class CohortSampler:
    """Every member's batch indices for a step as one [P, B] tensor. Each member keeps its own
    `BatchOrder` (so its batches are those it would draw alone); permutations are made only at a
    member's epoch boundary and stacked, so a step costs one gather, not P Python calls."""

    def __init__(self, members: list[MemberPlan], batch_size: int, device: torch.device,
                 start_step: int = 0):
        self.orders = [BatchOrder(m.order_seed, m.n_train, batch_size) for m in members]
        self.batch_size = batch_size
        self.device = device
        self.steps_per_epoch = torch.tensor([o.steps_per_epoch for o in self.orders])
        self.uniform = bool((self.steps_per_epoch == self.steps_per_epoch[0]).all())
        width = max(o.n_train for o in self.orders)
        self.perms = torch.zeros((len(members), width), dtype=torch.long)
        for i, order in enumerate(self.orders):
            order.skip_to(start_step)
            if start_step % order.steps_per_epoch:  # starting within an epoch: its permutation
                self.perms[i, :order.n_train] = order.current
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
