"""The transformer's cohort kernel: every member's forward as one stacked computation over the
member axis, its gradients by autograd through it.

`vmap` over `functional_call` runs the module's code once with batched tensors, but each of its
ops goes through vmap's batching rules, and the backward pass through `grad_and_value`'s
transforms: at the sizes of a model zoo on a CPU that overhead is most of a step. Here the
forward is written for stacked parameters directly:
- activations [P, N*T, d], every linear layer one `baddbmm` against stacked weights
  [P, d_out, d_in] (the query, key and value projections concatenated into one);
- the token embedding one `F.embedding` lookup into the members' tables laid end to end
  [P*V, d] (each member's token ids offset by its index times V);
- attention as batched matmuls over [P*N*heads, T, head_dim] (a wider member's padded heads
  come last, as in the module): scores by one `baddbmm` onto the additive causal mask, softmax,
  the module's dropout of the probabilities, one `bmm` with the values. Measured on the 2-core
  CPU against `F.scaled_dot_product_attention(..., is_causal=True)` (one thread, T = 32, heads
  of 16): the same speed at width 64, the explicit form ~5% faster at width 16, and it drops
  the probabilities, which SDPA cannot (it takes no mask on them);
- the masked LayerNorm over each member's true width (the `width` buffer, [P]), GELU, the head;
- the loss: each member's mean cross-entropy over its marked positions (targets -100 ignored),
  as `F.cross_entropy` gives it per member.
Members do not interact, so the gradient of the sum of the members' losses is every member's
own gradient: one `torch.autograd.grad` gives them all. A written-out backward would gain little:
the batched matmuls are ~70% of a step (torch's profiler, one thread, width 64), and autograd's
backward of them is the same `bmm`s. Measured on the 2-core CPU (README "## Speed"), one thread:
1.1-1.2x `vmap` and 1.3x the sequential loop at 54k parameters, 1.2x `vmap` at 4k; chunking
the member axis (as fused.py does) gained nothing measurable at 32 members.

Dropout draws exactly the module's masks: `Transformer._dropout` hashes a member's key (its
`dropout_seed` and `dropout_calls`), the site and the index along each axis of the member's
tensor; `hashed_uniform` is elementwise in the key, so the stacked keys [P] give the stacked
masks [P, ...] in one call, and `dropout_calls` comes back one higher, as one training forward
of the module leaves it (`loss_grads_and_buffers`). Evaluation (`forward_shared`,
`features_shared`) runs in eval mode, without dropout; `forward_one` delegates to the module
(`VmapKernel.forward_one`), so that `torch.func` can differentiate it twice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dlstore.architectures.cnn2d import _LOW32, _hash
from dlstore.architectures.kernels import VmapKernel
from dlstore.architectures.transformer import TransformerOptions, hashed_uniform
from dlstore.stacks import Params

IGNORE = -100  # an unmarked target position (F.cross_entropy's ignore_index)


class TransformerKernel:
    def __init__(self, arch: TransformerOptions, input_shape: tuple[int, ...], n_classes: int):
        self.generic = VmapKernel(arch, input_shape, n_classes)  # forward_one: the module
        self.buffers = self.generic.buffers
        self.classifier = arch.classifier_layer()
        self.depth, self.head_dim, self.p = arch.depth, arch.head_dim, arch.dropout

    # -- the stacked forward -------------------------------------------------------------------

    def _layer_norm(self, params: Params, name: str, x: torch.Tensor,
                    true: torch.Tensor | None, n: torch.Tensor | None) -> torch.Tensor:
        """`transformer.LayerNorm` of x [P, M, d] over each member's true units (`true` [P, 1, d]
        ones and zeros, `n` [P, 1, 1] their count; None where no member is padded: then the
        fused `F.layer_norm`, whose backward is one op instead of a dozen)."""
        weight, bias = params[f"{name}.weight"].unsqueeze(1), params[f"{name}.bias"].unsqueeze(1)
        if true is None:
            return torch.addcmul(bias, F.layer_norm(x, x.shape[-1:], eps=1e-5), weight)
        mean = (x * true).sum(-1, keepdim=True) / n
        centred = x - mean
        var = ((centred * true) ** 2).sum(-1, keepdim=True) / n
        return centred * torch.rsqrt(var + 1e-5) * weight + bias

    @staticmethod
    def _linear(params: Params, name: str, h: torch.Tensor) -> torch.Tensor:
        # h [P, M, d_in] -> [P, M, d_out]
        return torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), h,
                             params[f"{name}.weight"].transpose(1, 2))

    def _dropout(self, x: torch.Tensor, key: torch.Tensor | None, site: int) -> torch.Tensor:
        """The module's dropout at `site` on x [P, *member's shape], from the keys [P]."""
        if key is None:
            return x
        with torch.no_grad():
            keep = hashed_uniform(_hash((key ^ site) & _LOW32), x.shape[1:], x.device) >= self.p
            scale = keep.to(x.dtype) / (1.0 - self.p)
        return x * scale

    def _attention(self, params: Params, block: str, x: torch.Tensor, true: torch.Tensor,
                   n: torch.Tensor, shape: tuple[int, int, int], key: torch.Tensor | None,
                   site: int) -> torch.Tensor:
        members, batch, t = shape
        d = x.shape[-1]
        heads = d // self.head_dim
        h = self._layer_norm(params, f"{block}.ln1", x, true, n)  # [P, N*T, d]
        weight = torch.cat([params[f"{block}.{p}.weight"] for p in "qkv"], 1)  # [P, 3d, d]
        q_bias, v_bias = params[f"{block}.q.bias"], params[f"{block}.v.bias"]
        bias = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias], 1)  # no key bias
        qkv = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))  # [P, N*T, 3d]
        # -> 3 x [P*N*heads, T, head_dim]; a wider member's padded heads come last
        q, k, v = (qkv.view(members * batch, t, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
                   .reshape(3, -1, t, self.head_dim).unbind(0))
        causal = torch.full((t, t), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        att = torch.baddbmm(causal, q, k.transpose(1, 2), alpha=1 / math.sqrt(self.head_dim)
                            ).softmax(-1)  # [P*N*heads, T, T]
        att = self._dropout(att.view(members, batch, heads, t, t), key, site)
        y = torch.bmm(att.view(-1, t, t), v).view(members * batch, heads, t, self.head_dim)
        y = y.transpose(1, 2).reshape(members, batch * t, d)  # [P, N*T, d]
        out = self._linear(params, f"{block}.proj", y)
        return self._dropout(out.view(members, batch, t, d), key, site + 1).view_as(out)

    def _mlp(self, params: Params, block: str, x: torch.Tensor, true: torch.Tensor,
             n: torch.Tensor, shape: tuple[int, int, int], key: torch.Tensor | None,
             site: int) -> torch.Tensor:
        h = F.gelu(self._linear(params, f"{block}.fc",
                                self._layer_norm(params, f"{block}.ln2", x, true, n)))
        out = self._linear(params, f"{block}.out", h)  # [P, N*T, d]
        return self._dropout(out.view(*shape, -1), key, site).view_as(out)

    def _hidden(self, params: Params, tokens: torch.Tensor, key: torch.Tensor | None
                ) -> torch.Tensor:
        """The final-norm residual streams [P, N*T, d] of token ids `tokens` [P, N, T] (int64),
        `key` [P]: the members' dropout keys in a training forward, or None."""
        table = params["tok_emb.weight"]  # [P, V, d]
        members, vocab, d = table.shape
        _, batch, t = tokens.shape
        offsets = torch.arange(members, device=tokens.device).view(-1, 1, 1) * vocab
        h = F.embedding(tokens + offsets, table.reshape(members * vocab, d))  # [P, N, T, d]
        h = self._dropout(h + params["pos_emb.weight"][:, :t].unsqueeze(1), key, 0)
        h = h.view(members, batch * t, d)
        width = params["width"] if "width" in params else torch.full((members,), d)
        true = n = None  # no member padded
        if not bool((width == d).all()):
            true = (torch.arange(d, device=h.device) < width.view(-1, 1, 1).to(h.device)
                    ).to(h.dtype)  # [P, 1, d]
            n = width.view(-1, 1, 1).to(h)  # [P, 1, 1]
        shape = (members, batch, t)
        for i in range(self.depth):
            block = f"blocks.{i}"
            h = h + self._attention(params, block, h, true, n, shape, key, 1 + 3 * i)
            h = h + self._mlp(params, block, h, true, n, shape, key, 3 + 3 * i)
        return self._layer_norm(params, "ln_f", h, true, n)

    # -- training --------------------------------------------------------------------------------

    def _losses(self, params: Params, x: torch.Tensor, y: torch.Tensor,
                key: torch.Tensor | None) -> torch.Tensor:
        """Each member's mean cross-entropy [P] over its marked positions, of inputs [P, N, T]
        and targets [P, N, T]."""
        hidden = self._hidden(params, x.long(), key)
        logits = self._linear(params, self.classifier, hidden)  # [P, N*T, V]
        targets = y.reshape(y.shape[0], -1, 1)  # [P, N*T, 1]
        marked = (targets != IGNORE).to(logits.dtype)
        picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0))
        return -(picked * marked).sum((1, 2)) / marked.sum((1, 2))

    def _loss_and_grads(self, state: Params, x: torch.Tensor, y: torch.Tensor,
                        key: torch.Tensor | None) -> tuple[torch.Tensor, Params]:
        trainable = [k for k in state if k not in self.buffers]
        with torch.enable_grad():
            leaves = {k: state[k].detach().requires_grad_() for k in trainable}
            losses = self._losses({**state, **leaves}, x, y, key)
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        return losses.detach(), dict(zip(trainable, grads))

    def loss_grads_and_buffers(self, state: Params, x: torch.Tensor, y: torch.Tensor
                               ) -> tuple[torch.Tensor, Params, Params]:
        """Losses [P], gradients of the parameters and the buffers after this training forward
        ([P, ...] each; `dropout_calls` one higher where there is dropout), from stacks `state`
        of parameters and buffers."""
        buffers = {k: state[k] for k in self.buffers}
        key = None
        if self.p > 0:
            seed, calls = state["dropout_seed"], state["dropout_calls"]
            key = _hash((seed + _hash(calls & _LOW32)) & _LOW32)  # [P], as the module's
            buffers["dropout_calls"] = calls + 1
        losses, grads = self._loss_and_grads(state, x, y, key)
        return losses, grads, buffers

    def loss_and_grads(self, params: Params, x: torch.Tensor, y: torch.Tensor
                       ) -> tuple[torch.Tensor, Params]:
        """Losses [P] and gradients without dropout (parameters and the `width` buffer, which
        gets no gradient)."""
        if self.p > 0:
            raise ValueError("a network with dropout trains through loss_grads_and_buffers")
        return self._loss_and_grads(params, x, y, None)

    # -- evaluation ------------------------------------------------------------------------------

    def _shared_hidden(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        members = params["tok_emb.weight"].shape[0]
        tokens = x.long().expand(members, *x.shape)  # [P, N, T]
        return self._hidden(params, tokens, None).view(members, *x.shape, -1)  # [P, N, T, d]

    def forward_shared(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Logits [P, N, V, T] (class-first, as the module's) of every member on the same
        inputs [N, T]."""
        hidden = self._shared_hidden(params, x)
        members, batch, t, d = hidden.shape
        logits = self._linear(params, self.classifier, hidden.view(members, batch * t, d))
        return logits.view(members, batch, t, -1).transpose(2, 3)

    def features_shared(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """The last position's final-norm representation [P, N, d] (`Transformer.features`)."""
        return self._shared_hidden(params, x)[:, :, -1]

    def forward_one(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """One member's logits [N, V, T] by the module itself (`functional_call`), so that
        `torch.func` can differentiate it twice."""
        return self.generic.forward_one(params, x)
