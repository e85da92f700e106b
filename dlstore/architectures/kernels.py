"""Loss and gradients of a whole cohort in one pass: `loss_and_grads(params, x, y)` maps stacked
parameters [P, ...], inputs [P, B, ...] and labels [P, B] to per-member mean cross-entropy [P]
and per-member gradients.

Both also give every member's logits and penultimate features on shared inputs
(`forward_shared`, `features_shared`), one member's logits (`forward_one`, a function of its own
parameters that `torch.func` can differentiate twice), and name the classifier layer.

Three implementations:
- `VmapKernel`, for any architecture: `torch.func.vmap(grad_and_value(...))` over
  `functional_call` of the architecture's module;
- `MLPKernel`, the fast kernel `mlp` declares (`Architecture.cohort_kernel`): the forward and
  backward pass written out with batched matmuls (`baddbmm`/`bmm`). On a CPU it is several
  times faster than the generic path at the sizes of a model zoo, because autograd's layouts
  make the elementwise backward ops and `log_softmax` over ten classes slow there;
- `ConvNetKernel` (`dlstore.architectures.fused`), the fast kernel `cnn1d` declares: strided
  convolutions as batched matmuls over shifted views of blocked inputs, backward written out,
  for any number of spatial axes.
Equivalence tests pin them against the `torch.optim` reference.
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
            self.template = arch.build(input_shape, n_classes)
        self.arch = arch
        self._features_module = _Features(self.template, arch.features_method)
        self.classifier = arch.classifier_layer()
        self._grad = vmap(grad_and_value(self._loss))
        self._eval = vmap(self.forward_one, in_dims=(0, None))
        self._features = vmap(self._features_one, in_dims=(0, None))

    def forward_one(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, params, (x,))

    def _features_one(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self._features_module,
                               {f"net.{k}": v for k, v in params.items()}, (x,))

    def _loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.forward_one(params, x), y)

    def loss_and_grads(self, params: Params, x: torch.Tensor, y: torch.Tensor
                       ) -> tuple[torch.Tensor, Params]:
        grads, losses = self._grad(params, x, y)
        return losses, grads

    def forward_shared(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Logits [P, N, C] of every member on the same inputs [N, ...]."""
        return self._eval(params, x)

    def features_shared(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [P, N, d] (the module's declared features method) of every
        member."""
        self.arch.require("features_method", "penultimate features")
        return self._features(params, x)




def kernel_for(arch: Architecture, input_shape: tuple[int, ...], n_classes: int):
    """The kernel the architecture declares (`Architecture.cohort_kernel`; by default the
    generic VmapKernel)."""
    return arch.cohort_kernel(input_shape, n_classes)
