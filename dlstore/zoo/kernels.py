"""Loss and gradients of a whole cohort in one pass: `loss_and_grads(params, x, y)` maps stacked
parameters [P, ...], inputs [P, B, ...] and labels [P, B] to per-member mean cross-entropy [P]
and per-member gradients.

Both also give every member's logits and penultimate features on shared inputs
(`forward_shared`, `features_shared`), one member's logits (`forward_one`, a function of its own
parameters that `torch.func` can differentiate twice), and name the classifier layer.

Two implementations:
- `VmapKernel`, for any architecture: `torch.func.vmap(grad_and_value(...))` over
  `functional_call` of the architecture's module;
- `MLPKernel`, the fast kernel `mlp` declares (`Architecture.cohort_kernel`): the forward and
  backward pass written out with batched matmuls (`baddbmm`/`bmm`). On a CPU it is several
  times faster than the generic path at the sizes of a model zoo, because autograd's layouts
  make the elementwise backward ops and `log_softmax` over ten classes slow there. Equivalence
  tests pin both against the `torch.optim` reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from dlstore.zoo.models import Architecture, MLPOptions

Params = dict[str, torch.Tensor]


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


class MLPKernel:
    def __init__(self, arch: MLPOptions):
        self.n_layers = arch.depth + 1
        self.activation = arch.activation
        self.classifier = f"layers.{self.n_layers - 1}"

    def _act(self, z: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return torch.relu(z)
        if self.activation == "tanh":
            return torch.tanh(z)
        return F.gelu(z)

    def _act_backward(self, grad: torch.Tensor, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return torch.ops.aten.threshold_backward(grad, a, 0.0)
        if self.activation == "tanh":
            return torch.ops.aten.tanh_backward(grad, a)
        return torch.ops.aten.gelu_backward(grad, z)

    @staticmethod
    def _linear(params: Params, i: int, h: torch.Tensor) -> torch.Tensor:
        w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
        return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))

    def _forward(self, params: Params, h: torch.Tensor, keep: bool):
        """All layers on inputs `h` [P, B, features]; with `keep`, also the pre-activations
        and activations the backward pass needs."""
        zs, acts = [], [h]
        for i in range(self.n_layers):
            z = self._linear(params, i, h)
            if i < self.n_layers - 1:
                h = self._act(z)
                if keep:
                    zs.append(z)
                    acts.append(h)
            else:
                h = z
        return h, zs, acts

    @staticmethod
    def _first_layer(params: Params, x: torch.Tensor) -> torch.Tensor:
        # the first layer sees the same inputs for every member: one [N, in] x [in, P*out] matmul
        # instead of P small ones
        w, b = params["layers.0.weight"], params["layers.0.bias"]
        n_members, n_out, n_in = w.shape
        z = (x.flatten(1) @ w.reshape(n_members * n_out, n_in).T).view(-1, n_members, n_out)
        return z.transpose(0, 1) + b.unsqueeze(1)

    def features_shared(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [P, N, width]: the last hidden layer's activations (the inputs
        themselves for an MLP without hidden layers), as `MLP.features`."""
        if self.n_layers == 1:
            return x.flatten(1).expand(params["layers.0.weight"].shape[0], -1, -1)
        h = self._act(self._first_layer(params, x))
        for i in range(1, self.n_layers - 1):
            h = self._act(self._linear(params, i, h))
        return h

    def forward_shared(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        if self.n_layers == 1:
            return self._first_layer(params, x)
        return self._linear(params, self.n_layers - 1, self.features_shared(params, x))

    def forward_one(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """One member's logits [N, C] (parameters without the member axis)."""
        h = x.flatten(1)
        for i in range(self.n_layers):
            h = h @ params[f"layers.{i}.weight"].T + params[f"layers.{i}.bias"]
            if i < self.n_layers - 1:
                h = self._act(h)
        return h

    def loss_and_grads(self, params: Params, x: torch.Tensor, y: torch.Tensor
                       ) -> tuple[torch.Tensor, Params]:
        logits, zs, acts = self._forward(params, x.flatten(2), keep=True)
        batch = logits.shape[1]
        # cross-entropy and its gradient, softmax written out (log_softmax over few classes is
        # slow on CPU)
        shifted = logits - logits.amax(-1, keepdim=True)
        exp = shifted.exp()
        total = exp.sum(-1, keepdim=True)
        picked = shifted.gather(-1, y.unsqueeze(-1))
        losses = (total.log() - picked).squeeze(-1).mean(1)
        grad_z = exp / total
        grad_z.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(picked, -1.0))
        grad_z /= batch
        grads: Params = {}
        for i in reversed(range(self.n_layers)):
            grads[f"layers.{i}.weight"] = torch.bmm(grad_z.transpose(1, 2), acts[i])
            grads[f"layers.{i}.bias"] = grad_z.sum(1)
            if i > 0:
                grad_a = torch.bmm(grad_z, params[f"layers.{i}.weight"])
                grad_z = self._act_backward(grad_a, zs[i - 1], acts[i])
        return losses, grads


def kernel_for(arch: Architecture, input_shape: tuple[int, ...], n_classes: int):
    """The kernel the architecture declares (`Architecture.cohort_kernel`; by default the
    generic VmapKernel)."""
    return arch.cohort_kernel(input_shape, n_classes)
