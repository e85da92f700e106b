"""A 2-D convolutional network for images [C, H, W]: the Small CNN Zoo family of Unterthiner
et al. 2020 ("Predicting neural network accuracy from weights").

`depth` 3x3 convolutions of `width` channels, each with stride 2 and padding 1 (so an H x W map
becomes ceil(H / 2) x ceil(W / 2), 28 -> 14 -> 7 -> 4) and followed by the activation, then
global average pooling over the last map and one linear classifier. The defaults are the
paper's network: on 28x28x1 inputs with 10 classes, 160 + 2,320 + 2,320 + 170 = 4,970
parameters.

Global average pooling gives the classifier one input per channel whatever the image size, so
the linear layer's column j takes channel j: that is what makes a narrower network the
zero-padded corner of a wider one (channels first on both axes of every kernel), and what the
permutation symmetries say (each conv layer's channels permute with the next kernel's input
axis, the last layer's with the classifier's columns, one column each).

Dropout (`dropout` > 0, on the pooled features) must give a member the same noise whatever cohort
it trains in and the same noise as the plain reference loop: torch's generators cannot be
advanced per member inside `vmap`, and vmap's own `randomness="different"` draws one tensor for
the whole stack, so a member's mask would depend on its neighbours. The masks here are a hash
of a per-network seed (drawn from the init seed when the module is built), a counter of
training forwards, the example's position in its batch and the unit: two int64 buffers
(`dropout.seed`, `dropout.calls`) that travel in the state dict, advance in train mode only, and
make a cohort member's dropout exactly the reference's.

A cohort trains on the fused convolution kernel (`dlstore.architectures.fused`: every member's
convolutions as batched matmuls, backward written out), dropout included: `dropout_mask` draws
the masks of a whole cohort from the stacked seeds and counters, as the module draws its own.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from dlstore.architectures.base import (
    ACTIVATIONS,
    Activation,
    Architecture,
    SizeEstimate,
    weight_tensors,
)
from dlstore.architectures.registry import register_arch
from dlstore.errors import SpecError

# Training steps of fewer examples x pixels than this go to the generic vmap kernel: measured
# on the 2-core CPU (one thread, 64 members, bench/train_throughput.py --arch cnn2d), vmap ran
# 1.3x the fused kernel at 14x14 and batch 32 (6,272), both the same at 20x20 and batch 32
# (12,800), and the fused kernel 1.2-1.4x vmap at 14x14 and batch 128 or 28x28 and batch 32
GENERIC_BELOW = 12_800

_LOW32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # a 32-bit integer hash's multiplier (< 2^31: no int64 product overflows)


def _hash(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 values in [0, 2^32), elementwise (vmap-safe)."""
    x = ((x ^ (x >> 16)) * _MIX) & _LOW32
    x = ((x ^ (x >> 16)) * _MIX) & _LOW32
    return x ^ (x >> 16)


class HashedDropout(nn.Module):
    """Inverted dropout whose masks are a function of the network's own seed, its count of
    training forwards, the example's position in the batch and the unit (module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.register_buffer("seed", torch.randint(0, 2**32, ()))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, d]
        if not self.training:
            return x
        mask = dropout_mask(self.seed, self.calls, x.shape[0], x.shape[1], self.p, x.dtype)
        self.calls.add_(1)
        return x * mask / (1.0 - self.p)


def dropout_mask(seed: torch.Tensor, calls: torch.Tensor, n: int, d: int, p: float,
                 dtype: torch.dtype) -> torch.Tensor:
    """The masks [..., n, d] (1 kept, 0 dropped) of networks with seeds and forward counts
    [...] (0-d for one network, [P] for a cohort's stacks) on a batch of n examples of d
    units: unit j's draw depends on j alone, so a narrower network's masks are the leading
    columns of a wider one's."""
    key = _hash((seed + _hash(calls & _LOW32)) & _LOW32)
    rows = _hash((key[..., None] ^ torch.arange(n, device=seed.device)) & _LOW32)  # [..., n]
    units = _hash(torch.arange(d, device=seed.device))
    uniform = _hash(rows[..., :, None] ^ units).to(dtype) / 2.0**32  # [..., n, d]
    return (uniform >= p).to(dtype)


class CohortDropout:
    """`HashedDropout` of a whole cohort at once, for the fused kernel (`FeatureDropout`)."""

    buffers = ("dropout.seed", "dropout.calls")

    def __init__(self, rate: float):
        self.rate = rate

    def keep(self, buffers, batch: int, units: int, dtype: torch.dtype):
        seed, calls = buffers["dropout.seed"], buffers["dropout.calls"]
        return (dropout_mask(seed, calls, batch, units, self.rate, dtype),
                {"dropout.seed": seed, "dropout.calls": calls + 1})


class CNN2d(nn.Module):
    """Strided 3x3 convolutions, global average pooling, a linear classifier."""

    def __init__(self, in_channels: int, channels: int, depth: int, n_classes: int,
                 activation: str, dropout: float):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else channels, channels, 3, stride=2, padding=1)
            for i in range(depth))
        self.act = ACTIVATIONS[activation]()
        self.out = nn.Linear(channels, n_classes)
        # after the weights: its seed draws nothing they draw, and its buffers come last
        self.dropout = HashedDropout(dropout) if dropout > 0 else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features [N, channels] (after dropout in train mode)."""
        x = standard_layout(x)
        for conv in self.convs:
            x = self.act(conv(x))  # [N, channels, H_i, W_i]
        x = x.mean((2, 3))
        return self.dropout(x) if self.dropout is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


@register_arch("cnn2d")
class CNN2dOptions(Architecture):
    arch: Literal["cnn2d"]
    width: int = Field(default=16, ge=1, description="channels of every convolution")
    depth: int = Field(default=3, ge=1, description="number of 3x3 stride-2 convolutions")
    activation: Activation = "relu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0,
                           description="dropout rate on the pooled features (training only)")
    features_method: ClassVar[str] = "features"

    def build(self, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
        in_channels, _, _ = image_shape(input_shape, self.arch)
        return CNN2d(in_channels, self.width, self.depth, n_classes, self.activation,
                     self.dropout)

    def classifier_layer(self) -> str:
        return "out"

    def cohort_kernel(self, input_shape: tuple[int, ...], n_classes: int):
        # the convolutions as batched matmuls over the member axis, backward written out
        # (dlstore.architectures.fused): several times the generic vmap kernel on a CPU
        from dlstore.architectures.fused import ConvLayer, ConvNetKernel
        from dlstore.architectures.kernels import VmapKernel

        image_shape(input_shape, self.arch)
        layers = [ConvLayer(f"convs.{i}", (3, 3), (2, 2), (1, 1)) for i in range(self.depth)]
        # dropout draws the module's own masks (`dropout_mask`), from its buffers; steps of
        # few examples x pixels train faster on vmap's grouped convolutions (GENERIC_BELOW)
        return ConvNetKernel(layers, self.activation, "mean", "out", input_shape,
                             dropout=CohortDropout(self.dropout) if self.dropout > 0 else None,
                             generic=VmapKernel(self, input_shape, n_classes),
                             generic_below=GENERIC_BELOW)

    def padded_axes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        # kernels [out, in, 3, 3]: channels on both axes; biases [out]; the classifier [C, d]
        # takes one pooled channel per column; the dropout buffers are scalars
        axes = {k: (0, 1) if len(s) == 4 else (0,) if len(s) == 1 else () for k, s in
                shapes.items()}
        return axes | {"out.weight": (1,), "out.bias": ()}

    def prunable_tensors(self, state: dict[str, torch.Tensor]) -> list[str]:
        return weight_tensors(state)

    def permutation_symmetries(self, shapes: dict[str, tuple[int, ...]]):
        layers = [f"convs.{i}" for i in range(self.depth)] + ["out"]
        return [((f"{a}.weight", f"{a}.bias"), f"{b}.weight") for a, b in zip(layers, layers[1:])]

    def size(self, input_shape: tuple[int, ...], n_classes: int) -> SizeEstimate:
        c_in, height, width = image_shape(input_shape, self.arch)
        params = macs = activations = 0
        layers = self.depth
        while layers:  # as CNN2d shapes its maps
            after = ((height - 1) // 2 + 1, (width - 1) // 2 + 1)
            # once the map is 1x1 every further layer is the same: count them at once (a spec
            # may ask for a depth of 10^9)
            same = layers if after == (height, width) and c_in == self.width else 1
            (height, width), layers = after, layers - same
            params += same * (c_in * self.width * 9 + self.width)
            macs += same * c_in * self.width * 9 * height * width
            activations += same * 2 * self.width * height * width  # the conv's and activation's
            c_in = self.width
        dropout = self.width if self.dropout > 0 else 0
        return SizeEstimate(params + self.width * n_classes + n_classes,
                            activations + dropout + n_classes, macs + self.width * n_classes)


def standard_layout(x: torch.Tensor) -> torch.Tensor:
    """Images [N, C, H, W] in the standard (row-major) layout. One channel's stride is free, and
    datasets built as `images[:, None]` give one that also reads as channels-last; oneDNN then
    takes its channels-last convolutions, whose backward corrupted the heap for a few small
    channel counts (torch 2.13 CPU: a resnet of width 2-6 on digits crashed within 15 steps).
    A copy of the input costs little next to the convolutions."""
    return x.clone(memory_format=torch.contiguous_format)


def image_shape(input_shape: tuple[int, ...], arch: str) -> tuple[int, int, int]:
    """(channels, height, width) of an image input."""
    if len(input_shape) != 3:
        raise SpecError(f"model.arch: {arch} needs image inputs [C, H, W], the dataset gives "
                        f"{list(input_shape)}")
    return input_shape
