"""Loss and gradients of a whole cohort in one pass: `loss_and_grads(params, x, y)` maps stacked
parameters [P, ...], inputs [P, B, ...] and labels [P, B] to per-member mean cross-entropy [P]
and per-member gradients.

Both also give every member's logits and penultimate features on shared inputs
(`forward_shared`, `features_shared`), one member's logits (`forward_one`, a function of its own
parameters that `torch.func` can differentiate twice), and name the classifier layer.

Four implementations:
- `VmapKernel`, for any architecture: `torch.func.vmap(grad_and_value(...))` over
  `functional_call` of the architecture's module;
- `MLPKernel`, the fast kernel `mlp` declares (`Architecture.cohort_kernel`): the forward and
  backward pass written out with batched matmuls (`baddbmm`/`bmm`). On a CPU it is several
  times faster than the generic path at the sizes of a model zoo, because autograd's layouts
  make the elementwise backward ops and `log_softmax` over ten classes slow there;
- `ConvNetKernel` (`dlstore.architectures.fused`), the fast kernel `cnn1d` and `cnn2d` declare:
  strided convolutions as batched matmuls over shifted views of blocked inputs, backward
  written out, for any number of spatial axes (and cnn2d's dropout, from its buffers);
- `TransformerKernel` (`dlstore.architectures.transformer_kernel`), the transformer's: one
  stacked forward over the member axis (`baddbmm` against stacked weights, attention as
  batched matmuls, the module's hashed dropout masks) and autograd through it.
Equivalence tests pin them against the `torch.optim` reference (and the transformer's against
each member's module).

Buffers. A module's state dict may hold tensors that are not parameters (BatchNorm's running
statistics and batch counter, cnn2d's dropout seed and counter): a kernel names them in
`buffers` (state-dict order; empty for the MLP kernel and every buffer-free module). They ride
in the same stacks [P, ...] as the parameters, so that checkpoints store them and `load_model`
gets them, but they are not trained: `loss_grads_and_buffers(state, x, y)` gives the loss,
gradients of the parameters only, and the buffers as one training forward leaves them, and the
trainer writes those back instead of optimizing them. `torch.func.vmap` cannot update a stacked
buffer in place from inside a member's forward, so the loss works on copies: each member's
buffers are cloned, handed to `functional_call` with the parameters, updated in place there by
the module's own code exactly as in a plain training step (`nn.BatchNorm2d`: momentum, unbiased
variance for the running estimate, `num_batches_tracked`), and returned as the auxiliary output
of `grad_and_value(..., has_aux=True)`. Everything that evaluates (`forward_shared`,
`forward_one`, `features_shared`) runs the module in eval mode, on the running statistics, as
`load_model` gives it; the loss runs it in train mode. Two templates hold the two modes, so that
an evaluation on another thread never sees a mode flip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from dlstore.architectures.base import Architecture
from dlstore.stacks import Params  # noqa: E402


class _Features(nn.Module):
    """Calls the module's declared features method through `functional_call` (which calls
    `forward`)."""

    def __init__(self, net: nn.Module, method: str | None):
        super().__init__()
        self.net = net
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.net, self.method)(x)


class VmapKernel:
    def __init__(self, arch: Architecture, input_shape: tuple[int, ...], n_classes: int):
        with torch.device("meta"):
            self.template = arch.build(input_shape, n_classes).eval()  # evaluation
            self._training = arch.build(input_shape, n_classes).train()  # the loss
        self.arch = arch
        self.buffers = buffer_names(self.template)
        self._features_module = _Features(self.template, arch.features_method)
        self.classifier = arch.classifier_layer()
        self._grad = vmap(grad_and_value(self._loss))
        self._grad_buffers = vmap(grad_and_value(self._loss_buffers, has_aux=True))
        self._eval = vmap(self.forward_one, in_dims=(0, None))
        self._features = vmap(self._features_one, in_dims=(0, None))

    def forward_one(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """One member's logits [N, C] in eval mode (`params`: its parameters and buffers)."""
        return functional_call(self.template, params, (x,))

    def _features_one(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self._features_module,
                               {f"net.{k}": v for k, v in params.items()}, (x,))

    def _loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(self._training, params, (x,)), y)

    def _loss_buffers(self, params: Params, buffers: Params, x: torch.Tensor, y: torch.Tensor
                      ) -> tuple[torch.Tensor, Params]:
        # copies, which the module's forward updates in place (running statistics, counters)
        state = {k: v.clone() for k, v in buffers.items()}
        logits = functional_call(self._training, {**params, **state}, (x,))
        return F.cross_entropy(logits, y), state

    def loss_and_grads(self, params: Params, x: torch.Tensor, y: torch.Tensor
                       ) -> tuple[torch.Tensor, Params]:
        """Losses [P] and gradients of a module without buffers."""
        grads, losses = self._grad(params, x, y)
        return losses, grads

    def loss_grads_and_buffers(self, state: Params, x: torch.Tensor, y: torch.Tensor
                               ) -> tuple[torch.Tensor, Params, Params]:
        """Losses [P], gradients of the parameters and the buffers after this training forward
        ([P, ...] each), from stacks `state` of parameters and buffers."""
        params = {k: v for k, v in state.items() if k not in self.buffers}
        buffers = {k: state[k] for k in self.buffers}
        grads, (losses, new_buffers) = self._grad_buffers(params, buffers, x, y)
        return losses, grads, new_buffers

    def forward_shared(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Logits [P, N, C] of every member on the same inputs [N, ...]."""
        return self._eval(params, x)

    def features_shared(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [P, N, d] (the module's declared features method) of every
        member."""
        self.arch.require("features_method", "penultimate features")
        return self._features(params, x)


def buffer_names(module: nn.Module) -> tuple[str, ...]:
    """The entries of the module's state dict that are not parameters, in state-dict order."""
    parameters = {name for name, _ in module.named_parameters()}
    return tuple(k for k in module.state_dict() if k not in parameters)


def kernel_for(arch: Architecture, input_shape: tuple[int, ...], n_classes: int):
    """The kernel the architecture declares (`Architecture.cohort_kernel`; by default the
    generic VmapKernel)."""
    return arch.cohort_kernel(input_shape, n_classes)
