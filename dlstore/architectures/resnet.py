"""Small pre-activation ResNets (He et al. 2016, "Identity mappings in deep residual networks")
for images [C, H, W] such as 28x28 or 32x32.

A 3x3 stem convolution to `width` channels, then `stages` stages of `blocks` basic blocks each,
the channels doubling from stage to stage (width, 2 width, 4 width, ...) and the first block of
every stage after the first halving the map with stride 2; then norm and activation, global
average pooling and a linear classifier. A block is

    h = act(norm1(x));  out = conv2(act(norm2(conv1(h)))) + shortcut

where the shortcut is x itself, or a 1x1 strided projection of h where the block changes the
shape. Convolutions carry biases only without normalisation (`norm = "none"`): a norm right
after would cancel them. `stages = 3, blocks = 1` is ResNet-8; `blocks = 3` ResNet-20.

`norm`:
- "batchnorm": `BatchNorm2d` below, `nn.BatchNorm2d` (momentum 0.1) written out, with its
  state dict. Its running statistics and batch counter are buffers: a cohort trains them as the
  module's own train-mode forward updates them (`dlstore.architectures.kernels`), and evaluates
  on them in eval mode, as `load_model` does. With ReLU, a run in a cohort can still part from
  the same run alone: vmap's grouped convolutions round ~1e-7 apart from the plain ones,
  BatchNorm centres pre-activations on the kink, and a pre-activation within rounding of zero
  flips now and then (tests/test_image_models.py);
- "groupnorm": `GroupNorm` below (`nn.GroupNorm` written out) with a fixed number of channels
  per group (`group_size`), so a stage of c channels has c / group_size groups;
- "none": no normalisation.

Padding to a wider member is exact for all three, so runs of several widths share a cohort:
every tensor's channel axes pad at the end (kernels [out, in, k, k] on axes 0 and 1, norm
weights, biases and running statistics on axis 0, the classifier [C, d] on axis 1), and a zero
channel with zero weights stays zero through every layer. BatchNorm normalises each channel on
its own: a zero channel has mean 0 and variance 0, so it normalises to 0 (times a zero weight)
and its running statistics stay 0. GroupNorm normalises groups of channels together, which is
why its groups have a fixed size, not a fixed count: with widths that are multiples of
`group_size` (checked), a narrower member's groups are the wider one's leading groups and its
padding fills whole groups of zeros. With a fixed number of groups, padding would regroup the
true channels and change what the member computes.

Permutation symmetries (`permutation_symmetries`), for norm "none" and "batchnorm":
- each block's inner channels (conv1's outputs) permute on their own: conv1's kernel and bias,
  norm2's weight, bias and running statistics on axis 0, conv2's kernel on axis 1;
- a stage's residual stream permutes as one: every tensor that writes it (the stem or the
  stage's first projection, and every block's conv2) and every norm that reads it (norm1 of the
  blocks it enters, the final norm after the last stage) on axis 0, and every layer that reads
  it (conv1 and the projection of the blocks it enters, the classifier after the last stage) on
  axis 1. A block adds conv2's output to its input channel by channel, so the channels of all
  blocks of a stage must move together.
BatchNorm normalises each channel on its own, so its parameters and buffers simply move with
their channel. GroupNorm normalises groups of channels together: only permutations that keep
every group's channels in one group keep the function, which the contract (any permutation of
the units) cannot say, so with groupnorm the symmetries are refused in one line.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from dlstore.architectures.base import (
    ACTIVATIONS,
    Activation,
    Architecture,
    SizeEstimate,
    UndeclaredProperty,
    weight_tensors,
)
from dlstore.architectures.cnn2d import image_shape, standard_layout
from dlstore.architectures.registry import register_arch

Norm = Literal["none", "groupnorm", "batchnorm"]


class BatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` (momentum 0.1, eps 1e-5) with its forward written in plain tensor ops.

    The same parameters, buffers and state dict, and the same updates in train mode: the batch
    mean and biased variance normalise, the running mean and the unbiased variance enter the
    running estimates with momentum 0.1, `num_batches_tracked` counts the batches; eval mode
    normalises with the running estimates. Written out because vmap's batching rule for the
    fused kernel computes the statistics differently (outputs ~1e-6 apart), and BatchNorm
    centres pre-activations on ReLU's kink, where such differences flip units and a cohort
    member drifts from the reference run (1e-2 after 5 steps on digits); these ops round the
    same way in a cohort as alone. The updates work in place on the buffers, as
    `nn.BatchNorm2d`'s do, on the copies the cohort kernel hands in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W]
        if self.training:
            mean = x.mean((0, 2, 3))  # [C]
            var = x.var((0, 2, 3), correction=0)
            n = x.numel() // x.shape[1]
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach() * m)
            self.running_var.mul_(1 - m).add_(var.detach() * (m * n / max(n - 1, 1)))
            self.num_batches_tracked.add_(1)
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight * torch.rsqrt(var + self.eps)
        return ((x - mean[None, :, None, None]) * scale[None, :, None, None]
                + self.bias[None, :, None, None])


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` with its forward written in plain tensor ops, for the reason BatchNorm2d
    is: under vmap the fused kernel rounds differently from the plain one (outputs ~5e-7
    apart, and a mixed-width cohort ended 1e-5 from the reference), these ops alike."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W]
        n, c, h, w = x.shape
        groups = x.reshape(n, self.num_groups, c // self.num_groups * h * w)
        mean = groups.mean(2, keepdim=True)
        var = groups.var(2, correction=0, keepdim=True)
        normed = ((groups - mean) * torch.rsqrt(var + self.eps)).reshape(n, c, h, w)
        return normed * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def _norm(kind: str, channels: int, group_size: int) -> nn.Module | None:
    if kind == "batchnorm":
        return BatchNorm2d(channels)
    if kind == "groupnorm":
        return GroupNorm(channels // group_size, channels)
    return None


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, group_size: int,
                 activation: str):
        super().__init__()
        bias = norm == "none"
        self.norm1 = _norm(norm, c_in, group_size)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.norm2 = _norm(norm, c_out, group_size)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.proj = (nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias)
                     if stride != 1 or c_in != c_out else None)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, c_in, H, W]
        h = self.act(self.norm1(x) if self.norm1 is not None else x)
        shortcut = self.proj(h) if self.proj is not None else x  # [N, c_out, H', W']
        h = self.conv1(h)
        h = self.act(self.norm2(h) if self.norm2 is not None else h)
        return self.conv2(h) + shortcut


class ResNet(nn.Module):
    def __init__(self, in_channels: int, width: int, stages: int, blocks: int, n_classes: int,
                 norm: str, group_size: int, activation: str):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=norm == "none")
        layers, c_in = [], width
        for stage in range(stages):
            c_out = width * 2**stage
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(PreActBlock(c_in, c_out, stride, norm, group_size, activation))
                c_in = c_out
        self.blocks = nn.ModuleList(layers)
        self.norm = _norm(norm, c_in, group_size)
        self.act = ACTIVATIONS[activation]()
        self.out = nn.Linear(c_in, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features [N, channels of the last stage]."""
        x = self.stem(standard_layout(x))
        for block in self.blocks:
            x = block(x)
        x = self.act(self.norm(x) if self.norm is not None else x)
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


@register_arch("resnet")
class ResNetOptions(Architecture):
    arch: Literal["resnet"]
    width: int = Field(default=16, ge=1, description="channels of the stem and the first stage "
                       "(doubling at every further stage)")
    stages: int = Field(default=3, ge=1, le=12, description="stages; each after the first "
                        "halves the map and doubles the channels")
    blocks: int = Field(default=1, ge=1, description="basic blocks per stage")
    norm: Norm = Field(default="batchnorm", description="normalisation before each activation")
    group_size: int = Field(default=8, ge=1, description="channels per group of groupnorm "
                            "(width must be a multiple)")
    activation: Activation = "relu"
    features_method: ClassVar[str] = "features"

    @model_validator(mode="after")
    def _groups_divide_width(self) -> ResNetOptions:
        if self.norm == "groupnorm" and self.width % self.group_size:
            raise ValueError(f"groupnorm needs a width that is a multiple of group_size "
                             f"{self.group_size}, got {self.width}")
        return self

    def build(self, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
        in_channels, _, _ = image_shape(input_shape, self.arch)
        return ResNet(in_channels, self.width, self.stages, self.blocks, n_classes, self.norm,
                      self.group_size, self.activation)

    def classifier_layer(self) -> str:
        return "out"

    def padded_axes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        # channels first on every axis that holds them (module docstring); scalars (the batch
        # counters) do not pad
        axes = {k: (0, 1) if len(s) == 4 else (0,) if len(s) == 1 else ()
                for k, s in shapes.items()}
        return axes | {"out.weight": (1,), "out.bias": ()}

    def prunable_tensors(self, state: dict[str, torch.Tensor]) -> list[str]:
        # the kernels and the classifier's weights; norm weights and buffers are 1-D or scalars
        return weight_tensors(state)

    def permutation_symmetries(self, shapes: dict[str, tuple[int, ...]]
                               ) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        # see the module docstring; the names are ResNet's, present ones only (biases exist
        # without norm, projections where a block changes the shape)
        if self.norm == "groupnorm":
            raise UndeclaredProperty(
                "permutation symmetries: resnet with norm = 'groupnorm' keeps its function only "
                "under permutations within each group, which canonical features and permutation "
                "augmentation cannot use; use norm = 'batchnorm' or 'none'")

        def per_channel(module: str, fields=("weight", "bias", "running_mean", "running_var")
                        ) -> tuple[str, ...]:
            return tuple(f"{module}.{f}" for f in fields if f"{module}.{f}" in shapes)

        def reads(block: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
            """What block `block` takes from its input stream: norms (axis 0), layers (axis 1)."""
            layers = [f"blocks.{block}.conv1.weight", f"blocks.{block}.proj.weight"]
            return per_channel(f"blocks.{block}.norm1"), tuple(n for n in layers if n in shapes)

        symmetries = []
        for i in range(self.stages * self.blocks):
            inner = per_channel(f"blocks.{i}.conv1") + per_channel(f"blocks.{i}.norm2")
            symmetries.append((inner, (f"blocks.{i}.conv2.weight",)))
        for stage in range(self.stages):
            first = stage * self.blocks
            writers = per_channel("stem" if stage == 0 else f"blocks.{first}.proj")
            entered = range(first + (stage > 0), first + self.blocks)  # blocks fed by the stream
            writers += sum((per_channel(f"blocks.{i}.conv2") for i in
                            range(first, first + self.blocks)), ())
            if stage + 1 < self.stages:
                entered = [*entered, first + self.blocks]
                norms, readers = (), ()
            else:
                norms, readers = per_channel("norm"), ("out.weight",)
            for i in entered:
                block_norms, block_readers = reads(i)
                norms, readers = norms + block_norms, readers + block_readers
            symmetries.append((writers + norms, readers))
        return symmetries

    def size(self, input_shape: tuple[int, ...], n_classes: int) -> SizeEstimate:
        c_in, height, width = image_shape(input_shape, self.arch)
        has_norm, bias = self.norm != "none", self.norm == "none"
        counts = {"params": 0, "macs": 0, "activations": 0}

        def conv(c_in: int, c_out: int, kernel: int, area: int, times: int = 1) -> None:
            counts["params"] += times * (c_in * c_out * kernel * kernel + (c_out if bias else 0))
            counts["macs"] += times * c_in * c_out * kernel * kernel * area
            counts["activations"] += times * c_out * area

        def norm_act(channels: int, area: int, times: int = 1) -> None:
            counts["params"] += times * 2 * channels if has_norm else 0
            counts["activations"] += times * channels * area * (2 if has_norm else 1)

        def block(c_in: int, c_out: int, stride: int, times: int = 1) -> None:
            nonlocal height, width
            after = ((height - 1) // stride + 1, (width - 1) // stride + 1)
            norm_act(c_in, height * width, times)
            if stride != 1 or c_in != c_out:
                conv(c_in, c_out, 1, after[0] * after[1], times)
            height, width = after
            conv(c_in, c_out, 3, height * width, times)
            norm_act(c_out, height * width, times)
            conv(c_out, c_out, 3, height * width, times)

        conv(c_in, self.width, 3, height * width)
        c_in = self.width
        for stage in range(self.stages):  # as ResNet shapes its layers
            c_out = self.width * 2**stage
            block(c_in, c_out, 2 if stage > 0 else 1)
            # the stage's further blocks are all alike: counted at once (blocks may be 10^9)
            block(c_out, c_out, 1, times=self.blocks - 1)
            c_in = c_out
        norm_act(c_in, height * width)
        counts["params"] += c_in * n_classes + n_classes
        counts["macs"] += c_in * n_classes
        counts["activations"] += n_classes
        return SizeEstimate(counts["params"], counts["activations"], counts["macs"])
