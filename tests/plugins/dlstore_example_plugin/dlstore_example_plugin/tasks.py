"""Sparse parity: the label is the parity of the first `k` of `bits` random +-1 inputs."""

import torch
from pydantic import Field

import dlstore


class Parity(dlstore.Dataset):
    bits: int = Field(default=6, ge=1)
    k: int = Field(default=2, ge=1)
    n_samples: int = Field(default=512, ge=8)
    data_seed: int = 0

    def generate(self) -> dlstore.DatasetTensors:
        g = torch.Generator().manual_seed(self.data_seed)
        x = torch.randint(0, 2, (self.n_samples, self.bits), generator=g) * 2.0 - 1.0
        y = ((x[:, :self.k] < 0).sum(1) % 2).long()
        n_test = self.n_samples // 4
        return dlstore.DatasetTensors(x[n_test:], y[n_test:], x[:n_test], y[:n_test], 2)
