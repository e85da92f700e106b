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
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dlstore.errors import SpecError
from dlstore.seeds import seed_for

Activation = Literal["relu", "tanh", "gelu"]
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
# Initialisation schemes for every weight matrix / kernel (biases start at zero, the scales of
# norm layers, 1-D weights, at their own init: one); "default" keeps PyTorch's own init (biases
# included), so specs without `init` train exactly as before.
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
    init_scale: float = Field(default=1.0, gt=0, le=100, allow_inf_nan=False,
                              description="factor on every weight matrix / kernel the scheme "
                              "draws (its std times this); biases and norm scales unscaled")

    # Declared properties (class attributes, so that they are no options of a spec):
    # - the built module's method that gives the penultimate features [N, d] (neural collapse,
    #   CKA); None = undeclared
    features_method: ClassVar[str | None] = None
    # - reads token ids [T] and predicts a token at every position (logits [N, V, T]): it trains
    #   on sequence tasks (per-position targets) and nothing else, every other network on
    #   classification data (one label per example)
    predicts_tokens: ClassVar[bool] = False

    def check_targets(self, per_position: bool, dataset: str) -> None:
        """Refuse, in one line, data whose targets this network does not predict."""
        if self.predicts_tokens and not per_position:
            raise SpecError(f"model: {self.arch} predicts a token at every position; dataset "
                            f"{dataset} gives one class per example; use a sequence dataset "
                            "(arithmetic, sparse_parity, markov, text)")
        if per_position and not self.predicts_tokens:
            raise SpecError(f"model: {self.arch} predicts one class per example; dataset "
                            f"{dataset} is a sequence task with a target at every position; "
                            "use arch = \"transformer\"")

    def build(self, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
        raise NotImplementedError

    def classifier_layer(self) -> str | None:
        """State-dict prefix of the linear layer that maps the penultimate features to logits
        (`<prefix>.weight` [C, d], `<prefix>.bias` [C]); None = undeclared."""
        return None

    def padded_axes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]] | None:
        """Per tensor of the state dict (`shapes`: names and shapes, in order), the axes along
        which a narrower member is the zero-padded leading corner of a wider one: then runs that
        differ only in width share a cohort, each tensor padded at the end of these axes
        (`dlstore.stacks.pad_stack`; every other axis must match) and the padding held at zero.
        It is a promise that zero units with zero weights change nothing the member computes.
        None = undeclared: one cohort per width."""
        return None

    def prunable_tensors(self, state: dict[str, torch.Tensor]) -> list[str] | None:
        """Names of the tensors lottery tickets prune, in state-dict order, the output layer's
        last; None = undeclared."""
        return None

    def permutation_symmetries(self, shapes: dict[str, tuple[int, ...]]
                               ) -> list[tuple[tuple[str, ...], str | tuple[str, ...]]] | None:
        """The hidden units whose order does not change the network's function, for the weight
        space (`dlstore.analysis.wsl`: canonical features, permutation augmentation): per group
        of units that permute together, the tensors whose axis 0 indexes them (weight, bias, a
        norm's parameters and running statistics) and the tensor, or tensors, whose axis 1 takes
        them (in equal blocks where channels are flattened; several where more than one layer
        reads them, as every block of a residual stage does), as UNF's perm_spec says per
        tensor axis. `shapes`: the state dict's names and shapes, in order. None = undeclared;
        an architecture whose symmetries depend on its options may raise `UndeclaredProperty`
        for the options it cannot declare."""
        return None

    def cohort_kernel(self, input_shape: tuple[int, ...], n_classes: int):
        """The cohort kernel (`dlstore.zoo.kernels`): the generic `vmap` one unless an
        architecture declares a faster one."""
        from dlstore.architectures.kernels import VmapKernel

        return VmapKernel(self, input_shape, n_classes)

    def require(self, prop: str, feature: str) -> None:
        """Refuse `feature` unless property `prop` is declared."""
        declared = {"features_method": self.features_method is not None,
                    "classifier_layer": self.classifier_layer() is not None,
                    "padded_axes": self.pads_to_wider,
                    "prunable_tensors": (type(self).prunable_tensors
                                         is not Architecture.prunable_tensors),
                    "permutation_symmetries": (type(self).permutation_symmetries
                                               is not Architecture.permutation_symmetries)}[prop]
        if not declared:
            raise UndeclaredProperty(f"{feature}: architecture {self.arch!r} does not declare "
                                     f"`{prop}`, which {feature} needs")

    @property
    def pads_to_wider(self) -> bool:
        return type(self).padded_axes is not Architecture.padded_axes

    def family_key(self) -> str:
        """Everything that separates cohorts: runs whose keys match can share one. The width
        does not where the architecture pads to a wider member (in every built-in family a
        narrower network is the corner of a wider one: hidden units / channels first,
        channel-major flattening, and zero units with zero weights stay inert under any
        activation). The initialisation (scheme and scale) only decides where members start,
        so it does not separate cohorts either."""
        exclude = {"init_seed", "init", "init_scale"}
        if self.pads_to_wider:
            exclude.add("width")
        return self.model_dump_json(exclude=exclude)

    def size(self, input_shape: tuple[int, ...], n_classes: int) -> SizeEstimate:
        """Parameters, activations and forward cost of one example. This default builds the
        network (on the meta device, then once on the CPU); the registered families count
        analytically, so that a spec asking for a network larger than memory is refused before
        anything is allocated."""
        params = n_params(self, input_shape, n_classes)
        return SizeEstimate(params, activation_units(self, input_shape, n_classes), params)


class LayerChain(Architecture):
    """An architecture whose state dict is a chain of layers, each a weight then a bias, hidden
    units (or channels, flattened channel-major) first on every axis: the MLP and the 1-D CNN.
    For such a chain the optional properties follow from the state dict alone."""

    def padded_axes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return every_axis(shapes)

    def prunable_tensors(self, state: dict[str, torch.Tensor]) -> list[str]:
        return weight_tensors(state)

    def permutation_symmetries(self, shapes: dict[str, tuple[int, ...]]
                               ) -> list[tuple[tuple[str, ...], str]]:
        return chain_symmetries(shapes)


def weight_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Every tensor of two or more dimensions: weight matrices and kernels, not biases."""
    return [k for k, v in state.items() if v.dim() >= 2]


def every_axis(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Padding along every axis of every tensor: a chain of layers whose hidden units (or
    channels, flattened channel-major) come first on each axis."""
    return {k: tuple(range(len(s))) for k, s in shapes.items()}


def chain_symmetries(shapes: dict[str, tuple[int, ...]]) -> list[tuple[tuple[str, ...], str]]:
    """A chain of layers, each a weight then a bias (the built-ins' state dicts): the units of
    every layer but the last are permutable together with the next layer's inputs."""
    names = list(shapes)
    pairs = list(zip(names[0::2], names[1::2]))
    return [((weight, bias), next_weight)
            for (weight, bias), (next_weight, _) in zip(pairs[:-1], pairs[1:])]






def init_state(options: Architecture, input_shape: tuple[int, ...], n_classes: int,
               run_seed: int) -> dict[str, torch.Tensor]:
    """The initial parameters of one run, drawn from the run's init seed (PyTorch's default init,
    or the scheme `options.init` names) with every weight matrix / kernel multiplied by
    `options.init_scale`, independent of global RNG state and of anything else in the process."""
    seed = seed_for(options.init_seed, run_seed, "init")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = options.build(input_shape, n_classes)
        if options.init != "default":
            with torch.no_grad():
                for name, param in module.named_parameters():
                    if param.dim() >= 2:
                        _INITS[options.init](param)
                    elif name.rpartition(".")[2] != "weight":  # a norm's scale stays at one
                        param.zero_()
        if options.init_scale != 1.0:  # scale 1 leaves the draw bit for bit as it was
            with torch.no_grad():
                for param in module.parameters():
                    if param.dim() >= 2:
                        param.mul_(options.init_scale)
    return {k: v.detach() for k, v in module.state_dict().items()}


def activation_units(options: Architecture, input_shape: tuple[int, ...], n_classes: int) -> int:
    """Numbers one example produces across the network's layers (outputs of its leaf modules):
    what sets a cohort's activation memory per member and example."""
    total = 0

    def count(module, inputs, output) -> None:
        nonlocal total
        total += output[0].numel()

    # one real example on the CPU: a forward on the meta device costs over a second on its first
    # call (operator decompositions load), far more than this network's forward; in eval mode,
    # where BatchNorm takes a batch of one whatever its map size
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        module = options.build(input_shape, n_classes).eval()
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
