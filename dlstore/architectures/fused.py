"""Fused cohort convolutions: a chain of strided convolutions, an activation, a head (flatten or
global average pooling) and a linear classifier, for every member of a cohort at once, forward
and backward written out as batched matmuls over the member axis. Nothing here depends on the
number of spatial axes: a 2-D network runs the same code as a 1-D one (tests/test_fused.py runs
both against autograd through the networks' modules).

Layout. Activations are position-major with the member axis first, [P, *G, B, C] (a grid G of
positions over the spatial axes, then B examples, C channels): a row of a matmul is one
(position, example), and a shift by whole positions is a shift by whole rows.

- A hidden layer reads its input in blocks of `stride` positions along each axis,
  [P, *Q, B, *stride, C_in]: one row per (block, example), holding the block's positions and
  channels. Tap t = q * stride + r of output o sits in block o + q at phase r, so the taps of
  one block offset q are the rows shifted by q blocks, a range of their columns: the
  convolution is a sum of a few matmuls over views of one buffer (3 for a kernel of 5 at
  stride 2, 5 for 3x3 at stride 2), and its input gradient is the same matmuls transposed,
  added into the same views. Nothing copies a window: an im2col's windows are 2.5x its input
  at kernel 5, stride 2, and folding their gradient back takes strided adds; measured on this
  project's 2-core CPU (one thread, 256 cnn1d members of width 16) the im2col version ran
  1,180-1,250 model-steps/s, this one 1,450-1,700. Along every axis but the first a shifted
  slice runs on across block rows, so the grid there is Q wide, not S_out: the extra outputs
  are computed, never read, and get no gradient.
- The first layer is an im2col (one `index_select` of its zero-padded inputs, one `baddbmm`):
  its inputs have few channels, so windows are cheap, and it needs no input gradient. It
  writes its outputs straight into the second layer's blocks (the padding positions among
  them zeroed after the activation), so no copy into blocks happens there.

Backward passes are written out: they need only each layer's input rows, pre-activations and
activations. On a CPU these live in a per-thread `Workspace`: fresh tensors of a few MiB are
fresh pages from the operating system, whose faults cost 2-3x the arithmetic of a step.

Why not grouped convolutions (members on the channel axis, [B, P * C, L] with `groups=P`, one
`conv1d` per layer for the cohort, gradients by autograd of the summed losses, which is every
member's gradient at once since members do not interact): on a CPU (oneDNN) they measured no
faster than the generic `vmap` kernel, about 5x slower than this (bench/conv_kernels.py prints
the three side by side: 328, 298 and 1,575 model-steps/s in the run above).
For cnn2d's 2-D network (16 channels of 3x3 at stride 2 on 28x28x1, batch 128, one thread,
64 members, the machine shared with other jobs; `bench/conv_kernels.py --arch cnn2d`) grouped
`conv2d`s ran 47-62 model-steps/s, `vmap` 42-57, this kernel 91-135: the same picture in 2-D.
There a member's intermediates exceed `CHUNK_BYTES`, so chunks are single members; larger
budgets ran slower (109 at 64 MiB, 77 at 256, against 135 in the same run).

On a CPU members go through in chunks of about `CHUNK_BYTES` of intermediates: a step is
bound by memory traffic, so a chunk that stays in cache runs faster per member than the whole
cohort at once, and a chunk too small pays each op's fixed cost (about 1 ms a chunk) too often.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from dlstore.stacks import Params

# Intermediates of the members one pass handles at once, on a CPU: 16-32 MiB ran fastest
# (1,506-1,575 model-steps/s against 1,170 at 4 MiB, 1,289 at 64; bench/conv_kernels.py
# --chunks)
CHUNK_BYTES = 16 * 2**20

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu}

Activation = Literal["relu", "tanh", "gelu"]
# role, shape -> an uninitialised tensor (a workspace's reused memory, or a fresh one)
Buffer = Callable[[str, tuple[int, ...]], torch.Tensor]


class FeatureDropout(Protocol):
    """Inverted dropout on the head's features whose masks are the network's own (state-dict
    buffers, `buffers`), so that the kernel draws what the module draws: `keep` gives the
    masks [P, B, d] (1 kept, 0 dropped) of one training forward of B examples and the buffers
    as that forward leaves them; kept features are scaled by 1 / (1 - `rate`)."""

    rate: float
    buffers: tuple[str, ...]

    def keep(self, buffers: Params, batch: int, units: int, dtype: torch.dtype
             ) -> tuple[torch.Tensor, Params]: ...


@dataclass(frozen=True)
class ConvLayer:
    """One convolution of the chain: its state-dict prefix (`<name>.weight` [C_out, C_in, *k],
    `<name>.bias` [C_out]) and, per spatial axis, kernel size, stride and zero padding."""

    name: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]

    def out_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        return tuple((n + 2 * p - k) // s + 1
                     for n, k, s, p in zip(size, self.kernel, self.stride, self.padding))


@dataclass(frozen=True)
class _Piece:
    """One matmul of a blocked convolution: input rows `offset` blocks on (times B examples),
    columns [start, start + width) of each block row, the kernel's `taps` (a slice per axis)."""

    offset: int
    start: int
    width: int
    taps: tuple[slice, ...]


@dataclass(frozen=True)
class _Transfer:
    """One phase of the positions a blocked layer reads from the previous layer's grid: the
    index of those positions in its blocked input and in the grid (each a view)."""

    blocked: tuple
    grid: tuple


class _Geometry:
    """A layer's shapes: valid input `size` and output `out`, the output `grid` it computes,
    and for a blocked layer its input `blocks` per axis, matmul `pieces` and the `transfers`
    that fill its input from the previous grid."""

    def __init__(self, layer: ConvLayer, size: tuple[int, ...], first: bool, channels: int,
                 out_channels: int):
        self.layer, self.size, self.first, self.channels = layer, size, first, channels
        self.out_channels = out_channels
        self.out = layer.out_size(size)
        self.feeds: _Geometry | None = None  # the first layer: the blocked layer it writes
        self.dead: list[tuple] = []  # ... and that layer's positions that hold no data
        self._window_index: dict = {}
        n = len(size)
        if first:
            self.grid, self.blocks, self.pieces, self.transfers = self.out, (), [], []
            return
        stride, kernel = layer.stride, layer.kernel
        blocks = [-(-(m + 2 * p) // s) for m, p, s in zip(size, layer.padding, stride)]
        groups = [-(-k // s) for k, s in zip(kernel, stride)]
        # rows of one shifted slice: every block row along axes 2.. (their grid is Q wide)
        inner = math.prod(blocks[1:])
        self.grid = (self.out[0], *blocks[1:])
        rows = self.out[0] * inner
        strides_in_blocks = [math.prod(blocks[j + 1:]) for j in range(n)]
        furthest = sum((g - 1) * b for g, b in zip(groups, strides_in_blocks))
        blocks[0] = max(blocks[0], -(-(furthest + rows) // inner))  # slices stay inside
        self.blocks = tuple(blocks)
        self.slice_rows = rows  # rows of one shifted slice, per example
        self.row_width = math.prod(stride) * channels
        self.pieces = [piece for offsets in itertools.product(*(range(g) for g in groups))
                       for piece in self._pieces(offsets, strides_in_blocks)]
        self.transfers = []
        for phases in itertools.product(*(range(s) for s in stride)):
            blocked, grid = [], []
            for r, s, p, m in zip(phases, stride, layer.padding, size):
                low, high = -((r - p) // s), (p + m - 1 - r) // s  # blocks holding data
                low = max(low, 0)
                if high < low:
                    break
                blocked.append(slice(low, high + 1))
                first_position = low * s + r - p
                grid.append(slice(first_position, first_position + s * (high - low) + 1, s))
            else:
                self.transfers.append(_Transfer(
                    (slice(None), *blocked, slice(None), *phases, slice(None)),
                    (slice(None), *grid, slice(None), slice(None))))

    def feed_from(self, first: _Geometry) -> None:
        """Let the first layer write this layer's blocked input itself (its output rows in
        block order, [P, *Q, B, *stride, C]): no copy into blocks, and its outputs at positions
        that hold no data here (padding, the blocks' overhang) zeroed after the activation."""
        first.feeds = self
        n = len(self.size)
        for axis, (s, p, m, q) in enumerate(zip(self.layer.stride, self.layer.padding,
                                                self.size, self.blocks)):
            for r in range(s):
                low, high = max(0, -((r - p) // s)), (p + m - 1 - r) // s
                empty = [slice(0, q)] if high < low else [slice(0, low), slice(high + 1, q)]
                for blocks in empty:
                    if blocks.stop > blocks.start:
                        first.dead.append((slice(None), *([slice(None)] * axis), blocks,
                                           *([slice(None)] * (n - axis - 1)), slice(None),
                                           *([slice(None)] * axis), r,
                                           *([slice(None)] * (n - axis - 1)), slice(None)))

    def window_index(self, batch: int, device: torch.device
                     ) -> tuple[torch.Tensor, list[int], list[int]]:
        """The first layer's im2col as an index into its zero-padded inputs [B, C, *lengths]
        (data at `offsets`), for `batch` examples, cached."""
        key = (batch, device)
        if key not in self._window_index:
            layer, n = self.layer, len(self.size)
            if self.feeds is None:
                positions, offsets = self.out, layer.padding
            else:  # outputs at every position of the next layer's blocks, padding included
                positions = [q * s for q, s in zip(self.feeds.blocks, self.feeds.layer.stride)]
                offsets = [p + s * q for p, s, q in zip(layer.padding, layer.stride,
                                                        self.feeds.layer.padding)]
            lengths = [max(s * (m - 1) + k, o + size) for m, s, k, o, size in zip(
                positions, layer.stride, layer.kernel, offsets, self.size)]
            index = torch.arange(batch * self.channels * math.prod(lengths)).view(
                batch, self.channels, *lengths)
            for axis, (k, s) in enumerate(zip(layer.kernel, layer.stride)):
                index = index.unfold(2 + axis, k, s)  # [B, C, *positions, *k]
            index = index[(slice(None), slice(None), *(slice(0, m) for m in positions))]
            taps = range(2 + n, 2 + 2 * n)
            if self.feeds is None:  # [*S_out, B, *k, C]
                index = index.permute(*range(2, 2 + n), 0, *taps, 1)
            else:  # [*Q, B, *stride, *k, C]
                for axis in reversed(range(n)):
                    index = index.unflatten(2 + axis, (self.feeds.blocks[axis],
                                                       self.feeds.layer.stride[axis]))
                index = index.permute(*range(2, 2 + 2 * n, 2), 0, *range(3, 3 + 2 * n, 2),
                                      *(t + n for t in taps), 1)
            self._window_index[key] = (index.reshape(-1).to(device), lengths, list(offsets))
        return self._window_index[key]

    def rows(self, batch: int) -> int:
        """Output rows of `batch` examples."""
        if self.feeds is not None:
            return math.prod(self.feeds.blocks) * batch * math.prod(self.feeds.layer.stride)
        return math.prod(self.grid) * batch

    def _pieces(self, offsets: tuple[int, ...], strides_in_blocks: list[int]) -> list[_Piece]:
        """The matmuls of one block offset per axis: the taps t = q * s + r (r < a, a = how
        many of the block's phases are taps) as ranges of whole columns of a block row, whose
        layout is (r_1, .., r_n, c)."""
        stride, kernel, channels = self.layer.stride, self.layer.kernel, self.channels
        counts = [min(s, k - q * s) for q, s, k in zip(offsets, stride, kernel)]
        partial = [j for j, (a, s) in enumerate(zip(counts, stride)) if a < s]
        last = partial[-1] if partial else 0  # every later axis has all its phases
        offset = sum(q * b for q, b in zip(offsets, strides_in_blocks))
        later = math.prod(stride[last + 1:]) * channels  # columns of one phase of axis `last`
        pieces = []
        for leading in itertools.product(*(range(a) for a in counts[:last])):
            start = sum(r * math.prod(stride[j + 1:]) for j, r in enumerate(leading)) * channels
            taps = (*(slice(q * s + r, q * s + r + 1)
                      for q, s, r in zip(offsets, stride, leading)),
                    slice(offsets[last] * stride[last], offsets[last] * stride[last]
                          + counts[last]),
                    *(slice(q * s, q * s + s) for q, s in zip(offsets[last + 1:],
                                                              stride[last + 1:])))
            pieces.append(_Piece(offset, start, counts[last] * later, taps))
        return pieces


def activate(name: str, z: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The activation of `z`, in place where its backward needs only the output (relu, tanh);
    gelu's backward needs `z`, so it writes to `out`."""
    if name == "relu":
        return z.relu_()
    if name == "tanh":
        return z.tanh_()
    return torch._C._nn.gelu(z, out=out)


def activation_backward(name: str, grad: torch.Tensor, z: torch.Tensor, a: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
    """Gradient at the pre-activation `z`, written to `out`, from the gradient at the output
    `a` (views of any strides)."""
    if name == "relu":
        return torch.ops.aten.threshold_backward.grad_input(grad, a, 0.0, grad_input=out)
    if name == "tanh":
        return torch.ops.aten.tanh_backward.grad_input(grad, a, grad_input=out)
    return torch.ops.aten.gelu_backward.grad_input(grad, z, grad_input=out)


def cross_entropy_and_grad(logits: torch.Tensor, y: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member mean cross-entropy [P] of logits [P, B, C] and labels [P, B], and its gradient
    at the logits [P, B, C]; softmax written out (log_softmax over few classes is slow on a
    CPU)."""
    shifted = logits - logits.amax(-1, keepdim=True)
    exp = shifted.exp()
    total = exp.sum(-1, keepdim=True)
    picked = shifted.gather(-1, y.unsqueeze(-1))
    losses = (total.log() - picked).squeeze(-1).mean(1)
    grad = exp / total
    grad.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(picked, -1.0))
    grad /= logits.shape[1]
    return losses, grad


class Workspace:
    """Memory reused from one step to the next, per role (`get`). A fresh allocation of a few
    MiB on a CPU is fresh pages from the operating system (glibc returns them on free): the page
    faults of a cohort step's intermediates cost more than its arithmetic (measured on an early
    version of this kernel: 99k faults, 400 MB, per step of 256 cnn1d members; 600 ms of CPU
    time against 206 ms with memory reused)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self._memory: dict[str, torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised tensor of `shape` for `role`: the memory of the last call for that
        role, so a role's tensor must be dead before its role is asked for again."""
        n = math.prod(shape)
        memory = self._memory.get(role)
        if memory is None or memory.numel() < n:
            memory = self._memory[role] = torch.empty(n, dtype=self.dtype, device=self.device)
        return memory[:n].view(shape)


class ConvNetKernel:
    """The cohort kernel (`dlstore.architectures.kernels`) of a chain of convolutions, each
    followed by the activation, then a head (`flatten`: the last activations flattened
    channel-major, as `Tensor.flatten(1)` of [N, C, *S]; `mean`: averaged over the spatial
    axes) and the linear classifier `<classifier>.weight` [n_classes, d], `<classifier>.bias`.

    `input_shape` is an example's shape as the network's module takes it, channels first
    [C, *S]; inputs with that many numbers per example are reshaped to it (a 1-D sequence [L]
    gets its channel axis). A cohort of mixed widths is the widest's shapes, zero-padded
    (`Architecture.padded_axes`): zero channels stay zero through every layer, and the
    trainer masks their gradients.

    The same interface as `MLPKernel`: `loss_and_grads` for training, `forward_shared` and
    `features_shared` for the metrics, `forward_one` for what `torch.func` differentiates
    (Hessians), `classifier`.

    With `dropout` on the head's features the module has buffers (its masks' state, named in
    `buffers`): training goes through `loss_grads_and_buffers`, as `VmapKernel`'s does, and
    everything that evaluates runs without dropout, as the module in eval mode."""

    def __init__(self, layers: list[ConvLayer], activation: Activation,
                 head: Literal["flatten", "mean"], classifier: str,
                 input_shape: tuple[int, ...], chunk_bytes: int = CHUNK_BYTES,
                 dropout: FeatureDropout | None = None, generic=None, generic_below: int = 0):
        # training steps of fewer than `generic_below` examples x input positions go to
        # `generic` (a kernel of the same network, e.g. VmapKernel): where a member's step is
        # that small, the fused kernel's fixed cost per op outweighs what it saves
        self.generic, self.generic_below = generic, generic_below
        self.layers = layers
        self.dropout = dropout
        self.buffers = dropout.buffers if dropout is not None else ()
        self.activation = activation
        self.head = head
        self.classifier = classifier
        self.input_shape = tuple(input_shape)
        self.chunk_bytes = chunk_bytes
        self._geometry: dict[tuple[int, ...], list[_Geometry]] = {}
        self._local = threading.local()

    def __getstate__(self):  # the thread-local workspaces stay behind
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def _geometries(self, params: Params) -> list[_Geometry]:
        """Every layer's shapes, for the cohort's channel counts (the stacked widths)."""
        channels = (self.input_shape[0], *(params[f"{layer.name}.weight"].shape[1]
                                           for layer in self.layers))
        if channels not in self._geometry:
            size, out = self.input_shape[1:], []
            for i, layer in enumerate(self.layers):
                out.append(_Geometry(layer, size, i == 0, channels[i], channels[i + 1]))
                size = out[-1].out
            if len(out) > 1:
                out[1].feed_from(out[0])
            self._geometry[channels] = out
        return self._geometry[channels]

    def _buffer(self, dtype: torch.dtype, device: torch.device) -> Buffer:
        """Role, shape -> tensor: this thread's workspace on a CPU, a fresh tensor elsewhere."""
        if device.type != "cpu":
            return lambda role, shape: torch.empty(shape, dtype=dtype, device=device)
        spaces = self._local.__dict__.setdefault("workspaces", {})
        space = spaces.get(dtype) or spaces.setdefault(dtype, Workspace(dtype, device))
        return space.get

    def _prepare(self, params: Params, geometries: list[_Geometry]) -> dict[str, list]:
        """The weights as the matmuls take them, for the whole cohort at once: per layer the
        im2col kernel matrix or the pieces' matrices, and the classifier weight in the order
        of the head's features."""
        out = {}
        for g, layer in zip(geometries, self.layers):
            weight = params[f"{layer.name}.weight"]
            out[layer.name] = ([_kernel_matrix(weight)] if g.first
                               else _piece_matrices(weight, g.pieces))
        weight = params[f"{self.classifier}.weight"]
        if self.head == "flatten":  # the classifier reads channel-major features (c, *s)
            n_members, n_classes = weight.shape[:2]
            weight = weight.view(n_members, n_classes, weight.shape[2] // math.prod(
                geometries[-1].out), -1).transpose(2, 3).reshape(n_members, n_classes, -1)
        out[self.classifier] = [weight]
        return out

    # -- the batched pass ------------------------------------------------------------------

    def _forward(self, params: Params, matrices: dict[str, list], x: torch.Tensor,
                 geometries: list[_Geometry], buffer: Buffer, keep: bool):
        """Every layer on inputs `x` [P, B, ...]: the last layer's grid of activations
        [P, *G, B, C] and, with `keep`, what the backward pass needs of each layer (its input
        rows, pre-activation and activation)."""
        n_members, batch = x.shape[:2]
        h = x.reshape(n_members, batch, *self.input_shape)
        saved = []
        for i, (g, layer) in enumerate(zip(geometries, self.layers)):
            bias = params[f"{layer.name}.bias"].unsqueeze(1)
            c_out = bias.shape[-1]
            z = buffer(f"{i}.z", (n_members, g.rows(batch), c_out))
            if g.first:
                inputs = self._windows(g, h, buffer)  # [P, rows, prod(k) * C_in]
                torch.baddbmm(bias, inputs, matrices[layer.name][0], out=z)
            else:
                # [P, blocks * B, prod(stride) * C_in]
                inputs = h if i == 1 else self._blocked(g, h, batch, buffer)
                for j, (piece, matrix) in enumerate(zip(g.pieces, matrices[layer.name])):
                    rows = inputs[:, piece.offset * batch:(piece.offset + g.slice_rows) * batch,
                                  piece.start:piece.start + piece.width]
                    if j == 0:
                        torch.baddbmm(bias, rows, matrix, out=z)
                    else:
                        torch.baddbmm(z, rows, matrix, out=z)  # 1.4x baddbmm_ here
            a = activate(self.activation, z, buffer(f"{i}.a", z.shape)
                         if self.activation == "gelu" else None)
            if g.feeds is not None:  # the next layer's blocked input
                blocked = a.view(n_members, *g.feeds.blocks, batch, *g.feeds.layer.stride,
                                 c_out)
                for dead in g.dead:
                    blocked[dead].zero_()
                h = a.view(n_members, -1, g.feeds.row_width)
            else:
                h = a.view(n_members, *g.grid, batch, c_out)
            if keep:
                saved.append((inputs, z, a))
        return h, saved

    def _windows(self, g: _Geometry, x: torch.Tensor, buffer: Buffer) -> torch.Tensor:
        """The first layer's im2col of inputs [P, B, C, *S]: rows (position, example), or
        the blocked order of the layer it feeds, (block, example, phase); columns taps first,
        channels last. One `index_select` from the zero-padded inputs: 5x faster than copying
        the unfolded view, whose few-element runs are strided."""
        n_members, batch, channels = x.shape[:3]
        index, lengths, offsets = g.window_index(batch, x.device)
        padded = buffer("input", (n_members, batch, channels, *lengths)).zero_()
        padded[(slice(None), slice(None), slice(None),
                *(slice(o, o + m) for o, m in zip(offsets, g.size)))] = x
        windows = buffer("windows", (n_members, index.numel()))
        torch.index_select(padded.view(n_members, -1), 1, index, out=windows)
        return windows.view(n_members, -1, math.prod(g.layer.kernel) * channels)

    def _blocked(self, g: _Geometry, grid: torch.Tensor, batch: int, buffer: Buffer
                 ) -> torch.Tensor:
        """A hidden layer's input in blocks, [P, prod(Q) * B, prod(stride) * C], from the
        previous layer's grid [P, *G, B, C] (zero outside its valid positions)."""
        n_members, channels = grid.shape[0], grid.shape[-1]
        blocked = buffer(f"{g.layer.name}.blocked", (n_members, *g.blocks, batch,
                                                     *g.layer.stride, channels)).zero_()
        for transfer in g.transfers:
            blocked[transfer.blocked] = grid[transfer.grid]
        return blocked.view(n_members, -1, g.row_width)

    def _features(self, h: torch.Tensor, size: tuple[int, ...], buffer: Buffer
                  ) -> torch.Tensor:
        """Head features [P, B, d] of the last grid [P, *G, B, C] (valid positions `size`;
        `flatten`: positions first, channels last, as `_prepare` orders the classifier)."""
        valid = h[(slice(None), *(slice(0, m) for m in size))]
        n = len(size)
        if self.head == "mean":
            return valid.mean(tuple(range(1, 1 + n)))
        features = buffer("features", (h.shape[0], h.shape[-2], *size, h.shape[-1]))
        features.copy_(valid.permute(0, 1 + n, *range(1, 1 + n), 2 + n))
        return features.view(h.shape[0], h.shape[-2], -1)

    def _logits(self, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                ) -> torch.Tensor:
        """Logits [P, B, n_classes] (a transposed view): computed as W features^T, 2x faster
        than features W^T for few classes."""
        return torch.baddbmm(bias.unsqueeze(2), weight, features.transpose(1, 2)).transpose(1, 2)

    def _chunk_loss_and_grads(self, params: Params, matrices: dict[str, list], x: torch.Tensor,
                              y: torch.Tensor, geometries: list[_Geometry], buffer: Buffer,
                              out: Params, kept: torch.Tensor | None) -> torch.Tensor:
        """The members' losses [P]; their gradients written to `out` (in the matmuls' layouts,
        as `loss_and_grads` allocates them); `kept`: dropout masks of the features [P, B, d]."""
        n_members, batch = y.shape
        h, saved = self._forward(params, matrices, x, geometries, buffer, keep=True)
        last = geometries[-1]
        n = len(last.out)
        features = self._features(h, last.out, buffer)  # [P, B, d]
        if kept is not None:  # as the module computes it: x * mask / (1 - p)
            features = features * kept / (1.0 - self.dropout.rate)
        head_weight = matrices[self.classifier][0]  # [P, n_classes, d]
        logits = self._logits(features, head_weight, params[f"{self.classifier}.bias"])
        losses, grad = cross_entropy_and_grad(logits, y)  # [P], [P, B, n_classes]
        torch.bmm(grad.transpose(1, 2), features, out=out[f"{self.classifier}.weight"])
        torch.sum(grad, 1, out=out[f"{self.classifier}.bias"])
        grad_features = torch.bmm(grad, head_weight, out=buffer("features.grad",
                                                                features.shape))
        if kept is not None:  # (g * mask) / (1 - p): exactly autograd's (g / (1 - p)) * mask
            grad_features.mul_(kept).div_(1.0 - self.dropout.rate)
        c_last, valid = h.shape[-1], (slice(None), *(slice(0, m) for m in last.out))
        if self.head == "flatten":  # [P, *S, B, C], as the valid positions of the grid
            sources = [(grad_features.view(n_members, batch, *last.out, c_last)
                        .permute(0, *range(2, 2 + n), 1, 2 + n), valid)]
        else:
            grad_features.div_(math.prod(last.out))
            sources = [(grad_features.view(n_members, *([1] * n), batch, c_last)
                        .expand(n_members, *last.out, batch, c_last), valid)]
        for i in reversed(range(len(self.layers))):
            g, layer = geometries[i], self.layers[i]
            inputs, z, a = saved[i]
            c_out = z.shape[-1]
            grad_z = buffer(f"{i}.z.grad", z.shape)  # [P, rows, C_out]
            if g.feeds is not None:  # every output row has a gradient, the dead ones zeroed
                activation_backward(self.activation, sources.view(z.shape), z, a, grad_z)
                blocked = grad_z.view(n_members, *g.feeds.blocks, batch,
                                      *g.feeds.layer.stride, c_out)
                for dead in g.dead:
                    blocked[dead].zero_()
            else:
                if g.grid != g.out:
                    grad_z.zero_()  # outputs that no later layer reads
                shape = (n_members, *g.grid, batch, c_out)
                z, a, grid = z.view(shape), a.view(shape), grad_z.view(shape)
                for source, index in sources:
                    activation_backward(self.activation, source, z[index], a[index],
                                        grid[index])
            torch.sum(grad_z, 1, out=out[f"{layer.name}.bias"])
            if g.first:
                # windows^T grad_z, not grad_z^T windows: 1-5x faster for few output channels
                torch.bmm(inputs.transpose(1, 2), grad_z, out=out[f"{layer.name}.weight"])
                continue
            grad_inputs = buffer(f"{layer.name}.blocked.grad", inputs.shape).zero_()
            grad_taps = out[f"{layer.name}.weight"]  # [P, *k, C_in, C_out]
            for piece, matrix in zip(g.pieces, matrices[layer.name]):
                span = (slice(None), slice(piece.offset * batch,
                                           (piece.offset + g.slice_rows) * batch),
                        slice(piece.start, piece.start + piece.width))
                taps = grad_taps[(slice(None), *piece.taps)]
                taps.copy_(torch.bmm(inputs[span].transpose(1, 2), grad_z).view(taps.shape))
                grad_inputs[span].baddbmm_(grad_z, matrix.transpose(1, 2))
            if i == 1:  # the first layer wrote these blocks: their gradient is its output's
                sources = grad_inputs
            else:
                blocked = grad_inputs.view(n_members, *g.blocks, batch, *layer.stride, -1)
                sources = [(blocked[t.blocked], t.grid) for t in g.transfers]
        return losses

    def _chunks(self, geometries: list[_Geometry], n_members: int, batch: int,
                device: torch.device) -> list[slice]:
        """Slices of the member axis, each a pass: on a CPU as many members as fit their
        intermediates of `batch` examples (inputs and outputs of every layer, and their
        gradients) in `chunk_bytes`; elsewhere all of them."""
        if device.type != "cpu":
            return [slice(0, n_members)]
        floats = 0
        for g in geometries:
            if g.first:
                inputs = g.rows(1) * math.prod(g.layer.kernel) * g.channels
            else:
                inputs = math.prod(g.blocks) * g.row_width
            floats += 2 * (inputs + g.rows(1) * g.out_channels)
        step = max(1, min(n_members, self.chunk_bytes // (4 * batch * max(floats, 1))))
        return [slice(s, s + step) for s in range(0, n_members, step)]

    def loss_grads_and_buffers(self, state: Params, x: torch.Tensor, y: torch.Tensor
                               ) -> tuple[torch.Tensor, Params, Params]:
        """Losses [P], gradients of the parameters and the buffers after this training forward
        ([P, ...] each), from stacks `state` of parameters and buffers (the dropout's)."""
        if self._small(y):
            return self.generic.loss_grads_and_buffers(state, x, y)
        params = {k: v for k, v in state.items() if k not in self.buffers}
        kept, buffers = self.dropout.keep({k: state[k] for k in self.buffers}, y.shape[1],
                                          params[f"{self.classifier}.weight"].shape[-1],
                                          x.dtype)
        losses, grads = self._loss_and_grads(params, x, y, kept)
        return losses, grads, buffers

    def loss_and_grads(self, params: Params, x: torch.Tensor, y: torch.Tensor
                       ) -> tuple[torch.Tensor, Params]:
        """Per-member mean cross-entropy [P] and gradients of inputs `x` [P, B, ...] with labels
        `y` [P, B] (each member its own batch), of a network without dropout."""
        if self.dropout is not None:
            raise ValueError("a network with dropout trains through loss_grads_and_buffers")
        if self._small(y):
            return self.generic.loss_and_grads(params, x, y)
        return self._loss_and_grads(params, x, y, None)

    def _small(self, y: torch.Tensor) -> bool:
        """Whether a training step of labels `y` [P, B] goes to the generic kernel."""
        return (self.generic is not None
                and y.shape[1] * math.prod(self.input_shape[1:]) < self.generic_below)

    def _loss_and_grads(self, params: Params, x: torch.Tensor, y: torch.Tensor,
                        kept: torch.Tensor | None) -> tuple[torch.Tensor, Params]:
        n_members, batch = y.shape
        geometries = self._geometries(params)
        matrices = self._prepare(params, geometries)
        buffer = self._buffer(x.dtype, x.device)
        # the gradients in the matmuls' layouts, filled chunk by chunk
        grads: Params = {}
        for g, layer in zip(geometries, self.layers):
            weight = params[f"{layer.name}.weight"]
            grads[f"{layer.name}.weight"] = weight.new_empty(
                matrices[layer.name][0].shape if g.first
                else (n_members, *layer.kernel, weight.shape[2], weight.shape[1]))
            grads[f"{layer.name}.bias"] = torch.empty_like(params[f"{layer.name}.bias"])
        head = f"{self.classifier}.weight"
        grads[head] = torch.empty_like(matrices[self.classifier][0])
        grads[f"{self.classifier}.bias"] = torch.empty_like(params[f"{self.classifier}.bias"])
        losses = x.new_empty(n_members)
        for s in self._chunks(geometries, n_members, batch, x.device):
            losses[s] = self._chunk_loss_and_grads(
                {k: v[s] for k, v in params.items()},
                {k: [m[s] for m in v] for k, v in matrices.items()}, x[s], y[s], geometries,
                buffer, {k: v[s] for k, v in grads.items()}, None if kept is None else kept[s])
        n = len(self.input_shape) - 1
        for g, layer in zip(geometries, self.layers):
            name = f"{layer.name}.weight"
            grads[name] = (_kernel_grad(grads[name], params[name].shape) if g.first
                           else grads[name].permute(0, 2 + n, 1 + n, *range(1, 1 + n))
                           .contiguous())
        if self.head == "flatten":
            channels = params[head].shape[2] // math.prod(geometries[-1].out)
            grads[head] = grads[head].view(n_members, -1, math.prod(geometries[-1].out),
                                           channels).transpose(2, 3).reshape(params[head].shape)
        return losses, {k: grads[k] for k in params}

    def _shared(self, params: Params, x: torch.Tensor, logits: bool) -> torch.Tensor:
        geometries = self._geometries(params)
        matrices = self._prepare(params, geometries)
        buffer = self._buffer(x.dtype, x.device)
        size = geometries[-1].out
        n_members = next(iter(params.values())).shape[0]
        parts = []
        for s in self._chunks(geometries, n_members, x.shape[0], x.device):
            chunk = {k: v[s] for k, v in params.items()}
            members = next(iter(chunk.values())).shape[0]
            h, _ = self._forward(chunk, {k: [m[s] for m in v] for k, v in matrices.items()},
                                 x.expand(members, *x.shape), geometries, buffer, keep=False)
            features = self._features(h, size, buffer)
            if logits:
                parts.append(self._logits(features, matrices[self.classifier][0][s],
                                          chunk[f"{self.classifier}.bias"]).contiguous())
            elif self.head == "mean":
                parts.append(features)
            else:  # channel-major, as the module flattens; a new tensor, not the workspace's
                out = features.new_empty(features.shape)
                out.view(members, x.shape[0], -1, *size).copy_(
                    features.view(members, x.shape[0], *size, -1).movedim(-1, 2))
                parts.append(out)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def forward_shared(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Logits [P, N, n_classes] of every member on the same inputs [N, ...]."""
        return self._shared(params, x, logits=True)

    def features_shared(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [P, N, d] of every member, in the module's order (`flatten`:
        channel-major)."""
        return self._shared(params, x, logits=False)

    def forward_one(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """One member's logits [N, n_classes] (parameters without the member axis), with the
        functional convolutions, so that `torch.func` can differentiate it twice."""
        h = x.reshape(x.shape[0], *self.input_shape)
        conv = _CONVS[len(self.input_shape) - 1]
        for layer in self.layers:
            h = _ACTIVATIONS[self.activation](conv(
                h, params[f"{layer.name}.weight"], params[f"{layer.name}.bias"],
                stride=layer.stride, padding=layer.padding))
        h = h.mean(tuple(range(2, h.dim()))) if self.head == "mean" else h.flatten(1)
        return F.linear(h, params[f"{self.classifier}.weight"], params[f"{self.classifier}.bias"])


def _kernel_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Stacked kernels [P, C_out, C_in, *k] as im2col's right factor [P, prod(k) * C_in, C_out]
    (rows taps first, channels last, as a window is laid out)."""
    n = weight.dim() - 3
    return weight.permute(0, *range(3, 3 + n), 2, 1).reshape(weight.shape[0], -1,
                                                              weight.shape[1])


def _kernel_grad(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The gradient [P, prod(k) * C_in, C_out] of `_kernel_matrix` back in the kernels' own
    layout `shape` [P, C_out, C_in, *k]."""
    n_members, c_out, c_in, *kernel = shape
    n = len(kernel)
    return grad.view(n_members, *kernel, c_in, c_out).permute(0, 2 + n, 1 + n,
                                                              *range(1, 1 + n)).contiguous()


def _piece_matrices(weight: torch.Tensor, pieces: list[_Piece]) -> list[torch.Tensor]:
    """Each piece's taps of the kernels [P, C_out, C_in, *k] as its right factor
    [P, width, C_out] (rows in the block row's order: phases, then channels)."""
    n = weight.dim() - 3
    taps = weight.permute(0, *range(3, 3 + n), 2, 1)  # [P, *k, C_in, C_out]
    return [taps[(slice(None), *piece.taps)].reshape(weight.shape[0], -1, weight.shape[1])
            for piece in pieces]
