"""The multilayer perceptron, and its fast cohort kernel: batched matmuls over the member axis
instead of the generic `vmap` path.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dlstore.architectures.base import (
    ACTIVATIONS,
    Activation,
    LayerChain,
    SizeEstimate,
)
from dlstore.architectures.registry import register_arch
from dlstore.stacks import Params


class MLP(nn.Module):
    def __init__(self, n_in: int, width: int, depth: int, n_classes: int, activation: str):
        super().__init__()
        sizes = [n_in] + [width] * depth + [n_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[-1](self.features(x))

    def classifier_name(self) -> str:
        """State-dict prefix of the layer that maps `features` to logits."""
        return f"layers.{len(self.layers) - 1}"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer representation (input to the classifier)."""
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return x


@register_arch("mlp")
class MLPOptions(LayerChain):
    arch: Literal["mlp"]
    width: int = Field(default=64, ge=1, description="units per hidden layer")
    depth: int = Field(default=2, ge=0, description="number of hidden layers")
    activation: Activation = "relu"
    features_method: ClassVar[str] = "features"

    def build(self, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
        return MLP(math.prod(input_shape), self.width, self.depth, n_classes, self.activation)

    def classifier_layer(self) -> str:
        return f"layers.{self.depth}"

    def cohort_kernel(self, input_shape: tuple[int, ...], n_classes: int):
        # batched matmuls written out: several times faster than vmap on a CPU
        from dlstore.architectures.mlp import MLPKernel

        return MLPKernel(self)

    def size(self, input_shape: tuple[int, ...], n_classes: int) -> SizeEstimate:
        # closed forms, not a sum over layers: a spec may ask for a depth of 10^9
        n_in, w, d = math.prod(input_shape), self.width, self.depth
        macs = (n_in * w + (d - 1) * w * w + w * n_classes) if d else n_in * n_classes
        # each hidden layer's linear output and its activation's, then the logits
        return SizeEstimate(macs + d * w + n_classes, 2 * w * d + n_classes, macs)


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
