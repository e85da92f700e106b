"""Architectures: a spec's [model] table names one (`arch`) and gives its options; the options
class (a subclass of `dlstore.Architecture`) builds an ordinary `torch.nn.Module`.

The trainer stacks the parameters of many such modules and calls them functionally; `load_model`
builds the same module and loads one member's weights into it. The built-ins below are
registered by name with `@register_arch`; a plugin's class is found by import path or through the
`dlstore.architectures` entry points (`dlstore.plugins`), and both go through the same contract:
`build`, plus declared properties that features needing them check before anything trains.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from dlstore.errors import SpecError, format_validation_error
from dlstore.zoo.seeds import derive_seed

Activation = Literal["relu", "tanh", "gelu"]
_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
# Initialisation schemes for every weight matrix / kernel (biases start at zero); "default" keeps
# PyTorch's own init (biases included), so specs without `init` train exactly as before.
Init = Literal["default", "kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal",
               "orthogonal"]
_INITS = {
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "xavier_uniform": nn.init.xavier_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "orthogonal": nn.init.orthogonal_,
}


@dataclass(frozen=True)
class SizeEstimate:
    """A network's size for one example, counted without building it (`Architecture.size`)."""

    params: int
    activations: int  # numbers one example produces across the layers, as activation_units counts
    macs: int  # multiply-accumulates of one example's forward pass


class UndeclaredProperty(SpecError):
    """A feature needs a property its architecture does not declare."""


class Architecture(BaseModel):
    """The options of an architecture, validated like a spec's other tables (unknown fields
    refused). Subclasses add their options as fields and implement `build`.

    `width` and `depth` are typed columns of the runs table; an architecture without such a
    notion leaves them None. Everything beyond `build` is declared, and optional: a feature that
    needs an undeclared property refuses the architecture, in one line, before anything trains.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    arch: str
    width: int | None = None
    depth: int | None = None
    init_seed: int | None = Field(default=None, description="None = derived from the run seed")
    init: Init = Field(default="default", description="initialisation of the weights")

    # Declared properties (class attributes, so that they are no options of a spec):
    # - the built module's method that gives the penultimate features [N, d] (neural collapse,
    #   CKA); None = undeclared
    features_method: ClassVar[str | None] = None
    # - whether a narrower member is the zero-padded corner of a wider one (padding at the end
    #   of every axis of every tensor, as `population.pad_stack` does): then runs that differ
    #   only in width share a cohort. False = one cohort per width.
    pads_to_wider: ClassVar[bool] = False

    def build(self, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
        raise NotImplementedError

    def classifier_layer(self) -> str | None:
        """State-dict prefix of the linear layer that maps the penultimate features to logits
        (`<prefix>.weight` [C, d], `<prefix>.bias` [C]); None = undeclared."""
        return None

    def prunable_tensors(self, state: dict[str, torch.Tensor]) -> list[str] | None:
        """Names of the tensors lottery tickets prune, in state-dict order, the output layer's
        last; None = undeclared."""
        return None

    def permutation_symmetries(self, shapes: dict[str, tuple[int, ...]]
                               ) -> list[tuple[tuple[str, ...], str]] | None:
        """The hidden units whose order does not change the network's function, for the weight
        space (`dlstore.analysis.wsl`: canonical features, permutation augmentation): per hidden
        layer, the tensors whose axis 0 indexes its units (weight, bias) and the next tensor
        whose axis 1 takes them (in equal blocks where channels are flattened), as UNF's
        perm_spec says per tensor axis. `shapes`: the state dict's names and shapes, in order.
        None = undeclared."""
        return None

    def cohort_kernel(self, input_shape: tuple[int, ...], n_classes: int):
        """The cohort kernel (`dlstore.zoo.kernels`): the generic `vmap` one unless an
        architecture declares a faster one."""
        from dlstore.zoo.kernels import VmapKernel

        return VmapKernel(self, input_shape, n_classes)

    def require(self, prop: str, feature: str) -> None:
        """Refuse `feature` unless property `prop` is declared."""
        declared = {"features_method": self.features_method is not None,
                    "classifier_layer": self.classifier_layer() is not None,
                    "prunable_tensors": (type(self).prunable_tensors
                                         is not Architecture.prunable_tensors),
                    "permutation_symmetries": (type(self).permutation_symmetries
                                               is not Architecture.permutation_symmetries)}[prop]
        if not declared:
            raise UndeclaredProperty(f"{feature}: architecture {self.arch!r} does not declare "
                                     f"`{prop}`, which {feature} needs")

    def family_key(self) -> str:
        """Everything that separates cohorts: runs whose keys match can share one. The width
        does not where the architecture pads to a wider member (in every built-in family a
        narrower network is the corner of a wider one: hidden units / channels first,
        channel-major flattening, and zero units with zero weights stay inert under any
        activation). The initialisation only decides where members start, so it does not
        separate cohorts either."""
        exclude = {"init_seed", "init", "width"} if self.pads_to_wider else {"init_seed", "init"}
        return self.model_dump_json(exclude=exclude)

    def size(self, input_shape: tuple[int, ...], n_classes: int) -> SizeEstimate:
        """Parameters, activations and forward cost of one example. This default builds the
        network (on the meta device, then once on the CPU); the registered families count
        analytically, so that a spec asking for a network larger than memory is refused before
        anything is allocated."""
        params = n_params(self, input_shape, n_classes)
        return SizeEstimate(params, activation_units(self, input_shape, n_classes), params)


ArchOptions = Architecture  # the name this base had before plugins

ARCHS: dict[str, type[Architecture]] = {}


def register_arch(name: str):
    def add(cls: type[Architecture]) -> type[Architecture]:
        ARCHS[name] = cls
        return cls

    return add


class MLP(nn.Module):
    def __init__(self, n_in: int, width: int, depth: int, n_classes: int, activation: str):
        super().__init__()
        sizes = [n_in] + [width] * depth + [n_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = _ACTIVATIONS[activation]()

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
class MLPOptions(Architecture):
    arch: Literal["mlp"]
    width: int = Field(default=64, ge=1, description="units per hidden layer")
    depth: int = Field(default=2, ge=0, description="number of hidden layers")
    activation: Activation = "relu"
    features_method: ClassVar[str] = "features"
    pads_to_wider: ClassVar[bool] = True

    def build(self, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
        return MLP(math.prod(input_shape), self.width, self.depth, n_classes, self.activation)

    def classifier_layer(self) -> str:
        return f"layers.{self.depth}"

    def prunable_tensors(self, state: dict[str, torch.Tensor]) -> list[str]:
        return _weights(state)

    def permutation_symmetries(self, shapes: dict[str, tuple[int, ...]]):
        return _chain_symmetries(shapes)

    def cohort_kernel(self, input_shape: tuple[int, ...], n_classes: int):
        # batched matmuls written out: several times faster than vmap on a CPU
        from dlstore.zoo.kernels import MLPKernel

        return MLPKernel(self)

    def size(self, input_shape: tuple[int, ...], n_classes: int) -> SizeEstimate:
        # closed forms, not a sum over layers: a spec may ask for a depth of 10^9
        n_in, w, d = math.prod(input_shape), self.width, self.depth
        macs = (n_in * w + (d - 1) * w * w + w * n_classes) if d else n_in * n_classes
        # each hidden layer's linear output and its activation's, then the logits
        return SizeEstimate(macs + d * w + n_classes, 2 * w * d + n_classes, macs)


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
        self.act = _ACTIVATIONS[activation]()
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
class CNN1dOptions(Architecture):
    arch: Literal["cnn1d"]
    width: int = Field(default=32, ge=1, description="channels of every convolution")
    depth: int = Field(default=3, ge=1, description="number of convolution layers")
    kernel: int = Field(default=5, ge=1)
    activation: Activation = "relu"
    features_method: ClassVar[str] = "features"
    pads_to_wider: ClassVar[bool] = True

    def classifier_layer(self) -> str:
        return "out"

    def prunable_tensors(self, state: dict[str, torch.Tensor]) -> list[str]:
        return _weights(state)

    def permutation_symmetries(self, shapes: dict[str, tuple[int, ...]]):
        return _chain_symmetries(shapes)

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


def _weights(state: dict[str, torch.Tensor]) -> list[str]:
    """Every tensor of two or more dimensions: weight matrices and kernels, not biases."""
    return [k for k, v in state.items() if v.dim() >= 2]


def _chain_symmetries(shapes: dict[str, tuple[int, ...]]) -> list[tuple[tuple[str, ...], str]]:
    """A chain of layers, each a weight then a bias (the built-ins' state dicts): the units of
    every layer but the last are permutable together with the next layer's inputs."""
    names = list(shapes)
    pairs = list(zip(names[0::2], names[1::2]))
    return [((weight, bias), next_weight)
            for (weight, bias), (next_weight, _) in zip(pairs[:-1], pairs[1:])]


def _sequence_shape(input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(channels, length) of a cnn1d input."""
    if len(input_shape) == 1:
        return 1, input_shape[0]
    if len(input_shape) == 2:
        return input_shape[0], input_shape[1]
    raise SpecError(f"model.arch: cnn1d needs 1-D inputs, the dataset gives {input_shape}")


def parse_arch_options(raw: dict) -> Architecture:
    """Validate a spec's [model] table against its architecture's options, naming bad fields.
    `arch` is a built-in's or an entry point's name, or an import path `package.module:Class`."""
    from dlstore import plugins

    if not isinstance(raw, dict):
        raise SpecError(f"model: expected a table, got {type(raw).__name__}")
    name = raw.get("arch")
    if name is None:
        known = ", ".join(plugins.known_names("architecture", ARCHS))
        raise SpecError(f"model.arch: missing; known architectures: {known}")
    if not isinstance(name, str):
        raise SpecError(f"model.arch: expected a name or an import path, got {name!r}")
    cls = plugins.resolve("architecture", name, ARCHS, Architecture, "model.arch")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, "model")) from None


def init_state(options: Architecture, input_shape: tuple[int, ...], n_classes: int,
               run_seed: int) -> dict[str, torch.Tensor]:
    """The initial parameters of one run, drawn from the run's init seed (PyTorch's default init,
    or the scheme `options.init` names), independent of global RNG state and of anything else in
    the process."""
    seed = options.init_seed if options.init_seed is not None else derive_seed(run_seed, "init")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = options.build(input_shape, n_classes)
        if options.init != "default":
            with torch.no_grad():
                for param in module.parameters():
                    if param.dim() >= 2:
                        _INITS[options.init](param)
                    else:
                        param.zero_()
    return {k: v.detach() for k, v in module.state_dict().items()}


def activation_units(options: Architecture, input_shape: tuple[int, ...], n_classes: int) -> int:
    """Numbers one example produces across the network's layers (outputs of its leaf modules):
    what sets a cohort's activation memory per member and example."""
    total = 0

    def count(module, inputs, output) -> None:
        nonlocal total
        total += output[0].numel()

    # one real example on the CPU: a forward on the meta device costs over a second on its first
    # call (operator decompositions load), far more than this network's forward
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        module = options.build(input_shape, n_classes)
        hooks = [m.register_forward_hook(count) for m in module.modules()
                 if not list(m.children())]
        module(torch.zeros((1, *input_shape)))
    for hook in hooks:
        hook.remove()
    return total


@functools.lru_cache(maxsize=256)
def n_params(options: Architecture, input_shape: tuple[int, ...], n_classes: int) -> int:
    with torch.device("meta"):
        module = options.build(input_shape, n_classes)
    return sum(p.numel() for p in module.parameters())
