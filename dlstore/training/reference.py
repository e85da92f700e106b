"""The plain sequential reference: one `nn.Module`, one `torch.optim` optimizer, one run.

It is the definition the cohort trainer is tested against (same init, same batches, same
learning rates) and the baseline the throughput benchmark compares with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlstore.architectures.base import init_state
from dlstore.datasets.base import DatasetTensors
from dlstore.seeds import seed_for
from dlstore.spec import RunConfig
from dlstore.training.schedule import BatchOrder, lr_factor


def train_reference(run: RunConfig, data: DatasetTensors, device: str | torch.device = "cpu",
                    init: dict[str, torch.Tensor] | None = None,
                    mask: dict[str, torch.Tensor] | None = None
                    ) -> dict[int, dict[str, torch.Tensor]]:
    """Train `run` alone on `data` (the run's own tensors); return {step: state_dict} at the
    run's checkpoint steps. Stops early, like the cohort trainer freezes, if the loss diverges.

    A lottery ticket: `init` replaces the run's initial weights, `mask` (bool by tensor name)
    zeroes pruned weights and their gradients, and training starts at `run.start_step`."""
    train = run.train
    n_train = data.x_train.shape[0]
    total = train.total_steps(n_train)
    start = run.start_step
    save_at = set(run.checkpoint_steps(total))
    model = run.model.build(data.input_shape, data.n_classes)
    model.load_state_dict(init if init is not None else
                          init_state(run.model, data.input_shape, data.n_classes, run.seed))
    model.to(device)
    masked = [(p, mask[k].to(device, p.dtype)) for k, p in model.named_parameters()
              if mask and k in mask]
    with torch.no_grad():
        for p, m in masked:
            p.mul_(m)
    if train.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                              weight_decay=train.weight_decay)
    else:
        adam = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
        opt = adam(model.parameters(), lr=train.lr, betas=train.betas, eps=train.eps,
                   weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: lr_factor(train.schedule, start + t, total))
    order = BatchOrder(seed_for(train.order_seed, run.seed, "order"), n_train, train.batch_size)
    order.skip_to(start)
    x, y = data.x_train.to(device), data.y_train.to(device)
    states = {}
    for t in range(start, total + 1):
        if t in save_at:
            states[t] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if t == total:
            break
        idx = order.batch(t).to(device)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if not torch.isfinite(loss):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p, m in masked:
            p.grad.mul_(m)
        opt.step()
        sched.step()
    return states
