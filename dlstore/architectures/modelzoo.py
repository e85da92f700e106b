"""The small CNNs of the Model Zoos (Schürholt et al. 2022, "Model Zoos: a dataset of diverse
populations of neural network models"), as their `def_net.py` builds them, so that runs
imported from their Ray Tune trial directories load with `load_model`.

Three variants, named as their `params.json` names them (`model::type`):

- `CNN` (MNIST, Fashion-MNIST; 28x28): conv 5x5 -> 8, conv 5x5 -> 6, conv 2x2 -> 4, linear
  36 -> 20 -> classes (2,464 parameters on one input channel and 10 classes);
- `CNN2` (28x28): conv 5x5 -> 6, conv 5x5 -> 9, conv 2x2 -> 6, linear 54 -> 20 -> classes;
- `CNN3` (CIFAR-10, SVHN; 32x32): conv 3x3 -> 16, 32, 15, linear 60 -> 20 -> classes.

Each conv is followed by 2x2 max pooling (not the last conv of `CNN` and `CNN2`) and the
nonlinearity (`model::nlin`), dropout after each block when `model::dropout` > 0 (always in
`CNN3`). Their layers sit in one `module_list` whose indices count the pooling, activation and
dropout modules, so the state-dict names (`module_list.0.weight`, ...) are the published ones
and depend on `dropout`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import nn

from dlstore.architectures.base import Architecture, weight_tensors
from dlstore.architectures.cnn2d import image_shape
from dlstore.architectures.registry import register_imported_arch

NONLINEARITIES = {"leakyrelu": nn.LeakyReLU, "relu": nn.ReLU, "tanh": nn.Tanh,
                  "sigmoid": nn.Sigmoid, "silu": nn.SiLU, "gelu": nn.GELU}
# (out channels, kernel, pooled) of each conv, and the flattened size before the first linear
VARIANTS = {
    "CNN": ([(8, 5, True), (6, 5, True), (4, 2, False)], 3 * 3 * 4, 28),
    "CNN2": ([(6, 5, True), (9, 5, True), (6, 2, False)], 3 * 3 * 6, 28),
    "CNN3": ([(16, 3, True), (32, 3, True), (15, 3, True)], 15 * 2 * 2, 32),
}


class ModelZooCNN(nn.Module):
    def __init__(self, variant: str, channels_in: int, nlin: str, dropout: float,
                 n_classes: int):
        super().__init__()
        convs, flat, _ = VARIANTS[variant]
        always_dropout = variant == "CNN3"
        layers: list[nn.Module] = []
        c_in = channels_in
        for c_out, kernel, pooled in convs:
            layers.append(nn.Conv2d(c_in, c_out, kernel))
            if pooled:
                layers.append(nn.MaxPool2d(2, 2))
            layers.append(NONLINEARITIES[nlin]())
            if (dropout > 0 or always_dropout) and (pooled or always_dropout):
                layers.append(nn.Dropout(dropout))
            c_in = c_out
        layers += [nn.Flatten(), nn.Linear(flat, 20), NONLINEARITIES[nlin]()]
        if dropout > 0 or always_dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(20, n_classes))
        self.module_list = nn.ModuleList(layers)

    def features(self, x):
        for layer in self.module_list[:-1]:
            x = layer(x)
        return x

    def forward(self, x):
        return self.module_list[-1](self.features(x))


@register_imported_arch("modelzoo_cnn")
class ModelZooCNNOptions(Architecture):
    arch: Literal["modelzoo_cnn"]
    variant: Literal["CNN", "CNN2", "CNN3"] = Field(default="CNN",
                                                    description="params.json's model::type")
    nlin: Literal["leakyrelu", "relu", "tanh", "sigmoid", "silu", "gelu"] = "leakyrelu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    features_method: ClassVar[str] = "features"

    def build(self, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
        channels, _, _ = image_shape(input_shape, self.arch)
        return ModelZooCNN(self.variant, channels, self.nlin, self.dropout, n_classes)

    def classifier_layer(self) -> str:
        return f"module_list.{len(self.build((1, 28, 28), 10).module_list) - 1}"

    def prunable_tensors(self, state):
        return weight_tensors(state)


def input_size(variant: str) -> int:
    """The image side the variant assumes (28 or 32)."""
    return VARIANTS[variant][2]
