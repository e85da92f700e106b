"""Token-sequence tasks for the transformer, generated (or read from the user's own text file),
never downloaded.

Every task gives inputs x [N, T] (token ids held as float32, exact below 2^24) and targets
y [N, T] (int64): y[n, t] is the token to predict after reading x[n, :t+1], or IGNORE (-100,
what `F.cross_entropy` skips) at positions the task does not mark. The losses and accuracies
of a run are then per marked token. The classes are the vocabulary (`n_classes` = V), so the
transformer's head predicts a token at every position.

- `arithmetic`: Power et al. (2022)'s setting, "a op b =" -> c for all pairs of Z_p (b != 0
  for division, p prime), a train fraction of the pairs; only the answer position is marked,
  so the token accuracy is the answer-token accuracy.
- `sparse_parity`: n random bits and a read-out token; the target at the read-out position is
  the parity of k secret bits (Barak et al. 2022).
- `markov`: an order-k Markov source over V tokens whose transition distributions are drawn
  from a symmetric Dirichlet; its entropy rate (nats per token) is computed exactly and
  recorded with the split (`DatasetTensors.entropy_rate`). Each sequence starts from the
  stationary distribution and the first k-1 targets (predicted from fewer than k tokens) are
  not marked, so the best possible expected loss over the marked tokens is exactly the
  entropy rate: what a fitted irreducible loss is held against.
- `text`: character- or byte-level windows of a local text file (the user's own corpus).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from dlstore.datasets.base import Dataset, DatasetTensors, DataShape, as_tensors, test_size
from dlstore.datasets.registry import register_dataset
from dlstore.errors import DataSourceError, SpecError

IGNORE = -100  # a target position no loss or accuracy counts (F.cross_entropy's ignore_index)
MAX_MARKOV_STATES = 4096  # V^k: the stationary distribution is solved densely (V^2k floats)


class SequenceDataset(Dataset):
    """A dataset of token sequences: no label noise (a relabelled token is no longer a sequence
    of the task)."""

    @model_validator(mode="after")
    def _no_label_noise(self):
        if self.label_noise:
            raise ValueError(f"label_noise: {self.name} is a sequence task; label noise is for "
                             "classification datasets (leave it at 0)")
        return self


def sequence_tensors(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                     vocab: int, entropy_rate: float | None = None) -> DatasetTensors:
    t = as_tensors(x, y, x_test, y_test, vocab)
    return DatasetTensors(t.x_train, t.y_train, t.x_test, t.y_test, vocab, entropy_rate)


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


@register_dataset("arithmetic")
class ArithmeticOptions(SequenceDataset):
    """"a op b =" -> (a op b) mod p as tokens: numbers 0..p-1, then the operation's token (p)
    and "=" (p + 1); only the answer position is a target."""

    name: Literal["arithmetic"]
    p: int = Field(default=97, ge=2)
    operation: Literal["add", "sub", "mul", "div"] = "add"
    train_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)
    split_seed: int = 0

    @model_validator(mode="after")
    def _division_needs_a_field(self):
        if self.operation == "div" and not _is_prime(self.p):
            raise ValueError(f"operation div needs a prime p (every b != 0 invertible), got "
                             f"{self.p}")
        return self

    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        a, b = (g.ravel() for g in np.meshgrid(np.arange(self.p), np.arange(self.p),
                                               indexing="ij"))
        if self.operation == "div":
            keep = b != 0
            a, b = a[keep], b[keep]
        return a, b

    def answers(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        p = self.p
        if self.operation == "div":  # a * b^(p-2) = a / b in the field Z_p (Fermat)
            return np.array([(int(x) * pow(int(y), p - 2, p)) % p for x, y in zip(a, b)])
        return np.mod({"add": a + b, "sub": a - b, "mul": a * b}[self.operation], p)

    def generate(self) -> DatasetTensors:
        p = self.p
        a, b = self._pairs()
        x = np.stack([a, np.full_like(a, p), b, np.full_like(a, p + 1)], 1)  # [N, 4]
        y = np.full(x.shape, IGNORE)
        y[:, -1] = self.answers(a, b)
        order = np.random.default_rng(self.split_seed).permutation(len(a))
        n_test = test_size(len(a), 1.0 - self.train_fraction)
        test, train = order[:n_test], order[n_test:]
        return sequence_tensors(x[train], y[train], x[test], y[test], p + 2)

    def shape(self) -> DataShape:
        n = self.p * (self.p - 1) if self.operation == "div" else self.p * self.p
        return DataShape(n, (4,), self.p + 2)


@register_dataset("sparse_parity")
class SparseParityOptions(SequenceDataset):
    """n uniform bits (tokens 0, 1) and a read-out token (2); the read-out position's target is
    the parity of k secret positions drawn from `data_seed`."""

    name: Literal["sparse_parity"]
    n_bits: int = Field(default=20, ge=1)
    k: int = Field(default=3, ge=1)
    n_samples: int = Field(default=4000, ge=2, description="train + test")
    test_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    data_seed: int = Field(default=0, description="draws the secret positions and the bits")

    @model_validator(mode="after")
    def _k_within_n(self):
        if self.k > self.n_bits:
            raise ValueError(f"k: {self.k} relevant bits exceed the {self.n_bits} bits")
        return self

    def secret(self) -> np.ndarray:
        return np.sort(np.random.default_rng(self.data_seed).choice(self.n_bits, self.k,
                                                                    replace=False))

    def generate(self) -> DatasetTensors:
        rng = np.random.default_rng([self.data_seed, 1])
        bits = rng.integers(0, 2, (self.n_samples, self.n_bits))
        x = np.concatenate([bits, np.full((self.n_samples, 1), 2)], 1)  # [N, n + 1]
        y = np.full(x.shape, IGNORE)
        y[:, -1] = bits[:, self.secret()].sum(1) % 2
        n_test = test_size(self.n_samples, self.test_fraction)
        return sequence_tensors(x[n_test:], y[n_test:], x[:n_test], y[:n_test], 3)

    def shape(self) -> DataShape:
        return DataShape(self.n_samples, (self.n_bits + 1,), 3)


def stationary_distribution(transitions: np.ndarray, vocab: int, order: int) -> np.ndarray:
    """The stationary distribution over the V^k contexts of an order-k chain whose row s of
    `transitions` [V^k, V] is P(next token | context s); a context is the base-V number of its k
    tokens, oldest first, so s -> (s * V + token) mod V^k."""
    n_states = vocab**order
    if order == 0:
        return np.ones(1)
    nxt = (np.arange(n_states)[:, None] * vocab + np.arange(vocab)[None, :]) % n_states
    m = np.zeros((n_states, n_states))
    np.add.at(m, (np.repeat(np.arange(n_states), vocab), nxt.ravel()), transitions.ravel())
    # pi (M - I) = 0 with sum(pi) = 1: replace one equation by the normalisation
    a = m.T - np.eye(n_states)
    a[-1] = 1.0
    rhs = np.zeros(n_states)
    rhs[-1] = 1.0
    pi = np.linalg.solve(a, rhs)
    return np.clip(pi, 0.0, None) / np.clip(pi, 0.0, None).sum()


def entropy_rate(transitions: np.ndarray, vocab: int, order: int) -> float:
    """H = sum_s pi(s) H(P(. | s)) in nats per token: the entropy rate of the stationary chain."""
    pi = stationary_distribution(transitions, vocab, order)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(transitions > 0, np.log(transitions), 0.0)
    return float(-(pi * (transitions * logs).sum(1)).sum())


@register_dataset("markov")
class MarkovOptions(SequenceDataset):
    """Sequences of an order-k Markov source over V tokens with Dirichlet(concentration)
    transition rows drawn from `data_seed`; the entropy rate is exact (module docstring)."""

    name: Literal["markov"]
    vocab: int = Field(default=16, ge=2, description="tokens V")
    order: int = Field(default=2, ge=0, description="context length k of the source")
    concentration: float = Field(default=0.5, gt=0.0, description="Dirichlet concentration of "
                                 "each transition row (small: peaked rows, low entropy)")
    seq_len: int = Field(default=32, ge=2, description="tokens per sequence T")
    train_tokens: int = Field(default=65536, ge=1, description="training tokens (rounded down "
                              "to whole sequences)")
    test_tokens: int = Field(default=16384, ge=1, description="test tokens (whole sequences)")
    data_seed: int = Field(default=0, description="draws the source and the sequences")

    @model_validator(mode="after")
    def _sizes(self):
        if self.vocab**self.order > MAX_MARKOV_STATES:
            raise ValueError(f"vocab^order = {self.vocab}^{self.order} contexts exceed "
                             f"{MAX_MARKOV_STATES}; use a smaller vocab or order")
        if self.order > self.seq_len:
            raise ValueError(f"order {self.order} exceeds seq_len {self.seq_len}: no position "
                             "would see a full context")
        for field in ("train_tokens", "test_tokens"):
            if getattr(self, field) < self.seq_len:
                raise ValueError(f"{field}: {getattr(self, field)} is less than one sequence "
                                 f"of seq_len {self.seq_len}")
        return self

    def transitions(self) -> np.ndarray:
        """P(next | context) [V^k, V], the rows drawn from the Dirichlet."""
        rng = np.random.default_rng([self.data_seed, 0])
        return rng.dirichlet(np.full(self.vocab, self.concentration), self.vocab**self.order)

    def entropy_rate(self) -> float:
        return entropy_rate(self.transitions(), self.vocab, self.order)

    def sample(self, n_sequences: int, length: int, rng: np.random.Generator,
               transitions: np.ndarray) -> np.ndarray:
        """[n, length] tokens, each sequence started in the stationary distribution."""
        v, k = self.vocab, self.order
        n_states = v**k
        pi = stationary_distribution(transitions, v, k)
        cdf = np.cumsum(transitions, 1)
        cdf[:, -1] = 1.0  # rounding must not leave a draw above the last bin
        state = np.searchsorted(np.cumsum(pi), rng.random(n_sequences), side="right")
        state = np.minimum(state, n_states - 1)
        out = np.empty((n_sequences, length), dtype=np.int64)
        for j in range(k):  # the start context's tokens, oldest first
            out[:, j] = (state // v ** (k - 1 - j)) % v
        for t in range(k, length):
            u = rng.random(n_sequences)[:, None]
            token = (cdf[state] < u).sum(1)
            out[:, t] = token
            state = (state * v + token) % n_states
        return out

    def generate(self) -> DatasetTensors:
        transitions = self.transitions()
        rng = np.random.default_rng([self.data_seed, 1])
        t = self.seq_len
        n_train, n_test = self.train_tokens // t, self.test_tokens // t
        seqs = self.sample(n_train + n_test, t + 1, rng, transitions)  # [N, T + 1]
        x, y = seqs[:, :-1], seqs[:, 1:].copy()
        y[:, :max(self.order - 1, 0)] = IGNORE  # predicted from fewer than k tokens
        return sequence_tensors(x[:n_train], y[:n_train], x[n_train:], y[n_train:], self.vocab,
                                entropy_rate(transitions, self.vocab, self.order))

    def shape(self) -> DataShape:
        n = self.train_tokens // self.seq_len + self.test_tokens // self.seq_len
        return DataShape(n, (self.seq_len,), self.vocab, 8 * self.vocab**(2 * self.order))


@register_dataset("text")
class TextOptions(SequenceDataset):
    """Non-overlapping windows of `seq_len` + 1 tokens of a local text file: bytes (V = 256) or
    characters (V = the file's distinct characters, in code-point order). The last
    `test_fraction` of the file is the test split."""

    name: Literal["text"]
    path: str = Field(description="a UTF-8 text file of your own")
    level: Literal["char", "byte"] = "char"
    seq_len: int = Field(default=64, ge=1)
    test_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)

    def _file(self) -> Path:
        file = Path(self.path).expanduser()
        if not file.is_file():
            raise DataSourceError(f"dataset.path: {self.path} is not a file; the text dataset "
                                  "reads a local text file you name")
        return file

    def source(self) -> str:
        return f"the text file {self.path}"

    def source_state(self) -> str:
        stat = self._file().stat()
        return repr((self.path, stat.st_size, stat.st_mtime_ns))

    def tokens(self) -> tuple[np.ndarray, int]:
        raw = self._file().read_bytes()
        if self.level == "byte":
            return np.frombuffer(raw, dtype=np.uint8).astype(np.int64), 256
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataSourceError(f"dataset.path: {self.path} is not UTF-8 text ({e.reason} at "
                                  f"byte {e.start}); level = \"byte\" reads any file") from None
        chars = sorted(set(text))
        index = {c: i for i, c in enumerate(chars)}
        return np.array([index[c] for c in text], dtype=np.int64), max(len(chars), 2)

    def generate(self) -> DatasetTensors:
        tokens, vocab = self.tokens()
        t = self.seq_len
        cut = int(round(len(tokens) * (1.0 - self.test_fraction)))
        parts = []
        for part in (tokens[:cut], tokens[cut:]):
            n = (len(part) - 1) // t
            if n < 1:
                raise SpecError(f"dataset: {self.path} has {len(tokens)} tokens; a split with "
                                f"test_fraction {self.test_fraction:g} holds no window of "
                                f"seq_len {t} + 1")
            windows = np.stack([part[i * t:i * t + t + 1] for i in range(n)])
            parts += [windows[:, :-1], windows[:, 1:]]
        return sequence_tensors(*parts, vocab)
