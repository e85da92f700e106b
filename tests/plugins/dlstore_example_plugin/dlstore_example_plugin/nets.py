"""A residual MLP: trained by dlstore's generic vmap kernel (it declares no fast one)."""

import math

import torch
from pydantic import Field
from torch import nn

import dlstore


class ResidualNet(nn.Module):
    def __init__(self, n_in: int, width: int, blocks: int, n_classes: int):
        super().__init__()
        self.stem = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.head = nn.Linear(width, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x.flatten(1)))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ResMLP(dlstore.Architecture):
    width: int = Field(default=16, ge=1, description="units of the residual stream")
    depth: int = Field(default=1, ge=0, description="residual blocks")
    features_method = "features"  # penultimate features: neural collapse and CKA work

    def build(self, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
        return ResidualNet(math.prod(input_shape), self.width, self.depth, n_classes)

    def classifier_layer(self) -> str:
        return "head"
