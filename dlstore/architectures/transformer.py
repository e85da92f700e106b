"""A small decoder-only (causal) transformer over token sequences (`dlstore.datasets.sequences`),
GPT-2-like: learned token and position embeddings, `depth` pre-norm blocks of causal
self-attention and a GELU MLP, a final LayerNorm and an untied linear head over the vocabulary.

Inputs are token ids [N, T] (held as float32 in a dataset's tensors); the logits come
class-first, [N, V, T], the layout `F.cross_entropy` takes with per-position targets [N, T], so
the trainer's and the reference loop's loss is next-token cross-entropy over the positions the
task marks (the others carry the ignored target -100): the answer token for arithmetic, every
position with a full context for a language, the read-out position for parity.

Padding to a wider member is exact along `width` (d_model) and the MLP width, so runs of several
widths share a cohort:
- heads have a fixed size (`head_dim`), and a wider member has more of them: a padded head's
  query, key and value weights are zero, so it attends uniformly to zero values and adds nothing.
  A fixed number of heads could not pad: widening d_model would move every head's slice of it;
- LayerNorm normalises over the member's true width (`width`, a buffer of the state dict; the
  padded units are masked out of the mean and variance), and zero weight and bias keep the
  padded units of the residual stream at zero. Plain LayerNorm could not pad: zeros would
  enter its statistics;
- every other tensor pads at the end of its width axes (the MLP's hidden units are independent,
  and GELU(0) = 0). Depth, the context length, the vocabulary and `head_dim` do not pad.

Dropout (`dropout` > 0, on the embeddings, the attention probabilities and each residual branch)
draws from the network's own generator, not torch's: the masks hash a per-network seed (drawn
from the init seed after every weight), a count of training forwards, the dropout site and the
index along every axis, so a member's noise is the same in any cohort as alone (vmap's own
randomness would couple members), and padded units and heads, which come last on their axes,
leave the true ones' masks as they are.

A cohort trains on `TransformerKernel` (`dlstore.architectures.transformer_kernel`): this
forward stacked over the member axis, the same masks drawn from the stacked seeds and counters.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from dlstore.architectures.base import Architecture, SizeEstimate, weight_tensors
from dlstore.architectures.cnn2d import _LOW32, _hash
from dlstore.architectures.registry import register_arch
from dlstore.errors import SpecError


def hashed_uniform(key: torch.Tensor, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers of `shape`, a hash of the int64 `key` and of the index along each
    axis in turn (so an entry's number does not depend on how long any axis is)."""
    h = key
    for size in shape:
        index = _hash(torch.arange(1, size + 1, device=device))
        h = _hash((h.unsqueeze(-1) ^ index) & _LOW32)
    return h.to(torch.float32) / 2.0**32


class Transformer(nn.Module):
    def __init__(self, vocab: int, context: int, width: int, depth: int, head_dim: int,
                 mlp_width: int, n_classes: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim, self.p = width // head_dim, head_dim, dropout
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, mlp_width) for _ in range(depth))
        self.ln_f = LayerNorm(width)
        self.head = nn.Linear(width, n_classes)
        self.register_buffer("width", torch.tensor(width))
        if dropout > 0:  # after the weights: the seed draws nothing they draw
            self.register_buffer("dropout_seed", torch.randint(0, 2**32, ()))
            self.register_buffer("dropout_calls", torch.zeros((), dtype=torch.long))

    def _dropout(self, x: torch.Tensor, key: torch.Tensor | None, site: int) -> torch.Tensor:
        if key is None:
            return x
        keep = hashed_uniform(_hash((key ^ site) & _LOW32), x.shape, x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)

    def _attention(self, block: Block, x: torch.Tensor, key, site: int) -> torch.Tensor:
        n, t, d = x.shape
        h = block.ln1(x, self.width)
        # [N, T, d] -> [N, heads, T, head_dim]; a wider member's extra heads come last
        q, k, v = (proj(h).view(n, t, -1, self.head_dim).transpose(1, 2)
                   for proj in (block.q, block.k, block.v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # [N, heads, T, T]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        att = self._dropout(att, key, site)
        y = (att @ v).transpose(1, 2).reshape(n, t, d)  # [N, T, d]
        return self._dropout(block.proj(y), key, site + 1)

    def _mlp(self, block: Block, x: torch.Tensor, key, site: int) -> torch.Tensor:
        h = F.gelu(block.fc(block.ln2(x, self.width)))  # [N, T, mlp_width]
        return self._dropout(block.out(h), key, site)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The final-norm residual stream [N, T, d] of token ids x [N, T]."""
        tokens = x.long()
        t = tokens.shape[1]
        key = None
        if self.p > 0 and self.training:
            key = _hash((self.dropout_seed + _hash(self.dropout_calls & _LOW32)) & _LOW32)
            self.dropout_calls.add_(1)
        h = self.tok_emb(tokens) + self.pos_emb.weight[:t]  # [N, T, d]
        h = self._dropout(h, key, 0)
        for i, block in enumerate(self.blocks):
            h = h + self._attention(block, h, key, 1 + 3 * i)
            h = h + self._mlp(block, h, key, 3 + 3 * i)
        return self.ln_f(h, self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x)).transpose(1, 2)  # [N, V, T]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last position's final-norm representation [N, d] (the answer or read-out token of
        arithmetic and parity): the head's input there."""
        return self.hidden(x)[:, -1]


class LayerNorm(nn.Module):
    """LayerNorm over the first `width` units (the member's true width; the rest is padding)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x: torch.Tensor, width: torch.Tensor) -> torch.Tensor:  # [N, T, d]
        true = (torch.arange(x.shape[-1], device=x.device) < width).to(x.dtype)  # [d]
        n = width.to(x.dtype)
        mean = (x * true).sum(-1, keepdim=True) / n
        var = (((x - mean) * true) ** 2).sum(-1, keepdim=True) / n
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class Block(nn.Module):
    def __init__(self, width: int, mlp_width: int):
        super().__init__()
        self.ln1 = LayerNorm(width)
        self.q, self.v = nn.Linear(width, width), nn.Linear(width, width)
        # no key bias: it adds the same score to every key a query sees, which the softmax
        # ignores, so its gradient is pure rounding noise, and Adam would turn that noise into
        # steps of size lr (a cohort member then drifts 1e-3 from the same run alone)
        self.k = nn.Linear(width, width, bias=False)
        self.proj = nn.Linear(width, width)
        self.ln2 = LayerNorm(width)
        self.fc = nn.Linear(width, mlp_width)
        self.out = nn.Linear(mlp_width, width)


@register_arch("transformer")
class TransformerOptions(Architecture):
    arch: Literal["transformer"]
    width: int = Field(default=128, ge=1, description="d_model")
    depth: int = Field(default=2, ge=1, description="transformer blocks")
    head_dim: int = Field(default=32, ge=1, description="units per attention head (heads = "
                          "width / head_dim)")
    mlp_ratio: int = Field(default=4, ge=1, description="MLP width / d_model")
    context: int | None = Field(default=None, ge=1, description="positions (None = the task's "
                                "sequence length)")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout rate (training "
                           "only)")
    features_method: ClassVar[str] = "features"
    predicts_tokens: ClassVar[bool] = True

    @model_validator(mode="after")
    def _whole_heads(self) -> TransformerOptions:
        if self.width % self.head_dim:
            raise ValueError(f"width {self.width} must be a multiple of head_dim "
                             f"{self.head_dim} (heads have a fixed size)")
        return self

    def _shapes(self, input_shape: tuple[int, ...], n_classes: int) -> tuple[int, int]:
        if len(input_shape) != 1:
            raise SpecError(f"model: transformer needs token sequences [T], got inputs shaped "
                            f"{list(input_shape)}; use a sequence dataset (arithmetic, "
                            "sparse_parity, markov, text)")
        context = self.context or input_shape[0]
        if context < input_shape[0]:
            raise SpecError(f"model.context: {context} positions are fewer than the task's "
                            f"{input_shape[0]} tokens")
        return context, n_classes

    def build(self, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
        context, vocab = self._shapes(input_shape, n_classes)
        return Transformer(vocab, context, self.width, self.depth, self.head_dim,
                           self.mlp_ratio * self.width, n_classes, self.dropout)

    def classifier_layer(self) -> str:
        return "head"

    def cohort_kernel(self, input_shape: tuple[int, ...], n_classes: int):
        # the stacked forward, autograd through it: faster than vmap (transformer_kernel.py)
        from dlstore.architectures.transformer_kernel import TransformerKernel

        return TransformerKernel(self, input_shape, n_classes)

    def padded_axes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        # embeddings [V, d] and [T, d] and the head [V, d] pad on their d axis; every weight
        # inside a block on both axes; norms and biases on theirs; scalars (width, dropout
        # buffers) not at all (module docstring)
        axes = {k: tuple(range(len(s))) for k, s in shapes.items()}
        return axes | {"tok_emb.weight": (1,), "pos_emb.weight": (1,), "head.weight": (1,),
                       "head.bias": ()}

    def prunable_tensors(self, state: dict[str, torch.Tensor]) -> list[str]:
        # the linear layers' weights, the head's last; not the embedding tables
        return [k for k in weight_tensors(state) if not k.endswith("_emb.weight")]

    def size(self, input_shape: tuple[int, ...], n_classes: int) -> SizeEstimate:
        context, vocab = self._shapes(input_shape, n_classes)
        t, d, m, depth = input_shape[0], self.width, self.mlp_ratio * self.width, self.depth
        heads = d // self.head_dim
        block = 4 * d * d + 3 * d + (d * m + m) + (m * d + d) + 4 * d
        params = (vocab + context) * d + depth * block + 2 * d + d * n_classes + n_classes
        # per token: q, k, v, proj and the MLP; attention scores and mixing over <= T positions
        macs = t * (depth * (4 * d * d + 2 * d * m + 2 * t * d) + d * n_classes)
        activations = t * (d + depth * (8 * d + 2 * m + 2 * heads * t) + d + n_classes)
        return SizeEstimate(params, activations, macs)
