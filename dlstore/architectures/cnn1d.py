"""A 1-D convolutional network for sequence inputs [C, L] (MNIST-1D), and its fast cohort kernel
(the fused convolutions of `dlstore.architectures.fused`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from dlstore.architectures.base import (
    ACTIVATIONS,
    Activation,
    LayerChain,
    SizeEstimate,
)
from dlstore.architectures.registry import register_arch
from dlstore.errors import SpecError


class CNN1d(nn.Module):
    """Strided 1-D convolutions then a linear classifier, the MNIST-1D paper's CNN family."""

    def __init__(self, length: int, in_channels: int, channels: int, depth: int, kernel: int,
                 n_classes: int, activation: str):
        super().__init__()
        convs = []
        c_in = in_channels
        for _ in range(depth):
            convs.append(nn.Conv1d(c_in, channels, kernel, stride=2, padding=kernel // 2))
            c_in = channels
            length = (length + 2 * (kernel // 2) - kernel) // 2 + 1
        self.convs = nn.ModuleList(convs)
        self.act = ACTIVATIONS[activation]()
        self.out = nn.Linear(c_in * length, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # [N, L] sequences get a channel axis
            x = x.unsqueeze(1)
        for conv in self.convs:
            x = self.act(conv(x))
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))

    def classifier_name(self) -> str:
        return "out"


@register_arch("cnn1d")
class CNN1dOptions(LayerChain):
    arch: Literal["cnn1d"]
    width: int = Field(default=32, ge=1, description="channels of every convolution")
    depth: int = Field(default=3, ge=1, description="number of convolution layers")
    kernel: int = Field(default=5, ge=1)
    activation: Activation = "relu"
    features_method: ClassVar[str] = "features"

    def classifier_layer(self) -> str:
        return "out"

    def cohort_kernel(self, input_shape: tuple[int, ...], n_classes: int):
        # the convolutions as batched matmuls over the member axis, backward written out:
        # about 5x the generic vmap kernel on a CPU (dlstore.architectures.fused)
        from dlstore.architectures.fused import ConvLayer, ConvNetKernel

        layers = [ConvLayer(f"convs.{i}", (self.kernel,), (2,), (self.kernel // 2,))
                  for i in range(self.depth)]
        return ConvNetKernel(layers, self.activation, "flatten", "out",
                             _sequence_shape(input_shape))

    def build(self, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
        in_channels, length = _sequence_shape(input_shape)
        return CNN1d(length, in_channels, self.width, self.depth, self.kernel, n_classes,
                     self.activation)

    def size(self, input_shape: tuple[int, ...], n_classes: int) -> SizeEstimate:
        c_in, length = _sequence_shape(input_shape)
        params = macs = activations = 0
        layers = self.depth
        while layers:  # as CNN1d.__init__ shapes its layers
            after = (length + 2 * (self.kernel // 2) - self.kernel) // 2 + 1
            # once the length stops shrinking (at 1) every further layer is the same: count
            # them at once, as a spec may ask for a depth of 10^9
            same = layers if after == length and c_in == self.width else 1
            length, layers = after, layers - same
            params += same * (c_in * self.width * self.kernel + self.width)
            macs += same * c_in * self.width * self.kernel * length
            activations += same * 2 * self.width * length  # the convolution's and activation's
            c_in = self.width
        flat = c_in * length
        return SizeEstimate(params + flat * n_classes + n_classes, activations + n_classes,
                            macs + flat * n_classes)


def _sequence_shape(input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(channels, length) of a cnn1d input."""
    if len(input_shape) == 1:
        return 1, input_shape[0]
    if len(input_shape) == 2:
        return input_shape[0], input_shape[1]
    raise SpecError(f"model.arch: cnn1d needs 1-D inputs, the dataset gives {input_shape}")
