"""The sequence tasks (`dlstore.datasets.sequences`): the Markov source's exact entropy rate
against a hand-computed chain and against long samples, and the layout and truth of every
task's tokens and targets."""

import math

import numpy as np
import pytest
import torch

from dlstore.datasets.base import run_data
from dlstore.datasets.registry import parse_dataset_options
from dlstore.datasets.sequences import (
    IGNORE,
    MarkovOptions,
    entropy_rate,
    stationary_distribution,
)
from dlstore.errors import DataSourceError, SpecError


def dataset(**raw):
    return parse_dataset_options(raw)


def _h(p: float) -> float:
    return -p * math.log(p) - (1 - p) * math.log(1 - p)


# -- the Markov source -------------------------------------------------------------------------

def test_entropy_rate_of_a_two_state_chain_by_hand():
    # P(1 | 0) = a, P(0 | 1) = b: stationary (b, a) / (a + b), rate pi_0 h(a) + pi_1 h(b)
    a, b = 0.1, 0.2
    transitions = np.array([[1 - a, a], [b, 1 - b]])
    pi = stationary_distribution(transitions, 2, 1)
    np.testing.assert_allclose(pi, [2 / 3, 1 / 3], atol=1e-12)
    assert entropy_rate(transitions, 2, 1) == pytest.approx(2 / 3 * _h(a) + 1 / 3 * _h(b),
                                                            abs=1e-12)


def test_order_two_contexts_shift_in_the_newest_token():
    # an order-2 chain over {0, 1} whose next token copies the token two back (the context's
    # older one) with probability 0.9: the even and odd positions are two independent
    # symmetric chains, so pi is uniform over contexts, each with next-token entropy h(0.1)
    transitions = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])  # ctx 00,01,10,11
    np.testing.assert_allclose(stationary_distribution(transitions, 2, 2), [0.25] * 4,
                               atol=1e-12)
    assert entropy_rate(transitions, 2, 2) == pytest.approx(_h(0.1), abs=1e-12)


def test_order_zero_is_the_entropy_of_one_distribution():
    source = MarkovOptions(name="markov", vocab=5, order=0, seq_len=8, train_tokens=64,
                           test_tokens=64)
    [p] = source.transitions()
    assert source.entropy_rate() == pytest.approx(-(p * np.log(p)).sum(), abs=1e-12)


def test_the_exact_rate_matches_the_true_models_loss_on_a_long_sample():
    # ergodic average of -log P(x_t | context) over 400k tokens vs the exact rate: the standard
    # error of the mean is ~2e-3 here; allow 4 of them
    source = MarkovOptions(name="markov", vocab=6, order=2, concentration=0.7, seq_len=8,
                           train_tokens=64, test_tokens=64, data_seed=3)
    transitions = source.transitions()
    rng = np.random.default_rng(0)
    seqs = source.sample(200, 2001, rng, transitions)  # [200, 2001]
    context = seqs[:, :-2] * 6 + seqs[:, 1:-1]
    nll = -np.log(transitions[context, seqs[:, 2:]])
    se = nll.std() / math.sqrt(nll.size) * 3  # a little room for the chain's correlations
    assert abs(nll.mean() - source.entropy_rate()) < 4 * se
    # and the plug-in conditional entropy from counts (36 contexts x 6 tokens, 400k draws)
    counts = np.zeros((36, 6))
    np.add.at(counts, (context.ravel(), seqs[:, 2:].ravel()), 1)
    joint = counts / counts.sum()
    cond = counts / counts.sum(1, keepdims=True)
    plug_in = -(joint * np.log(np.where(cond > 0, cond, 1))).sum()
    assert plug_in == pytest.approx(source.entropy_rate(), abs=0.01)
    # contexts are visited with the stationary probabilities (sampling starts there)
    visits = np.bincount(context[:, 0], minlength=36) / 200
    np.testing.assert_allclose(visits, stationary_distribution(transitions, 6, 2), atol=0.12)


def test_markov_split_targets_are_the_next_tokens_with_short_contexts_unmarked():
    source = dataset(name="markov", vocab=8, order=3, seq_len=16, train_tokens=1600,
                     test_tokens=480)
    data = run_data(source, 0)
    assert data.x_train.shape == (100, 16) and data.x_test.shape == (30, 16)
    assert data.n_classes == 8 and data.entropy_rate == pytest.approx(source.entropy_rate())
    y, x = data.y_train, data.x_train.long()
    assert bool((y[:, :2] == IGNORE).all())  # predicted from 1 and 2 tokens: not targets
    assert torch.equal(y[:, 2:-1], x[:, 3:])  # the target at t is the token at t + 1
    assert 0 <= int(x.min()) and int(x.max()) < 8 and int(y[:, 2:].min()) >= 0
    again = run_data(dataset(name="markov", vocab=8, order=3, seq_len=16, train_tokens=1600,
                             test_tokens=480, n_train=50), 0)
    assert torch.equal(again.x_train, data.x_train[:50])  # subsets nest
    other = dataset(name="markov", vocab=8, order=3, seq_len=16, train_tokens=1600,
                    test_tokens=480, data_seed=1)
    assert other.entropy_rate() != source.entropy_rate()


@pytest.mark.parametrize("raw, message", [
    ({"vocab": 64, "order": 3}, "contexts exceed"),
    ({"vocab": 2, "order": 5, "seq_len": 4}, "exceeds seq_len"),
    ({"train_tokens": 10, "seq_len": 32}, "less than one sequence"),
    ({"label_noise": 0.1}, "label noise is for classification"),
])
def test_bad_markov_options_are_one_line(raw, message):
    with pytest.raises(SpecError) as e:
        dataset(name="markov", **raw)
    assert message in str(e.value) and "\n" not in str(e.value)


# -- arithmetic, parity, text ------------------------------------------------------------------

@pytest.mark.parametrize("operation, truth", [
    ("add", lambda a, b, p: (a + b) % p), ("sub", lambda a, b, p: (a - b) % p),
    ("mul", lambda a, b, p: (a * b) % p), ("div", lambda a, b, p: None)])
def test_arithmetic_answers_every_pair_once(operation, truth):
    p = 13
    data = run_data(dataset(name="arithmetic", p=p, operation=operation), 0)
    x = torch.cat([data.x_train, data.x_test]).long()
    y = torch.cat([data.y_train, data.y_test])
    n = p * (p - 1) if operation == "div" else p * p
    assert x.shape == (n, 4) and data.n_classes == p + 2
    assert len({tuple(r) for r in x[:, [0, 2]].tolist()}) == n
    assert bool((x[:, 1] == p).all() and (x[:, 3] == p + 1).all())
    assert bool((y[:, :3] == IGNORE).all())  # only the answer is a target
    assert data.x_test.shape[0] == round(n * 0.5)  # train_fraction 0.5
    for (a, _, b, _), c in zip(x.tolist(), y[:, 3].tolist()):
        if operation == "div":
            assert (c * b) % p == a
        else:
            assert c == truth(a, b, p)


def test_division_needs_a_prime():
    with pytest.raises(SpecError, match="prime"):
        dataset(name="arithmetic", p=12, operation="div")


def test_sparse_parity_reads_out_the_secret_bits():
    options = dataset(name="sparse_parity", n_bits=12, k=3, n_samples=400)
    data = run_data(options, 0)
    secret = options.secret()
    assert len(set(secret.tolist())) == 3 and secret.max() < 12
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        bits = x[:, :12].long()
        assert bool((x[:, 12] == 2).all()) and bool((y[:, :12] == IGNORE).all())
        assert torch.equal(y[:, 12], bits[:, secret].sum(1) % 2)
        # no single bit tells the parity: it is balanced given any one input bit
        assert 0.3 < y[:, 12].double().mean() < 0.7
    assert data.x_test.shape[0] == 100 and data.n_classes == 3


@pytest.mark.parametrize("level", ["char", "byte"])
def test_text_windows_spell_out_the_file(tmp_path, level):
    text = "the quick brown fox jumps over the lazy dog. " * 20 + "naïve"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    data = run_data(dataset(name="text", path=str(path), level=level, seq_len=10,
                            test_fraction=0.2), 0)
    if level == "char":
        chars = sorted(set(text))
        decode = "".join
        tokens = [chars.index(c) for c in text]
        assert data.n_classes == len(chars)
    else:
        decode = bytes
        tokens = list(text.encode())
        assert data.n_classes == 256
    x, y = data.x_train.long(), data.y_train
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    spelled = [t for row in x.tolist() for t in row]
    assert spelled == tokens[:len(spelled)]
    assert decode([chars[t] for t in spelled] if level == "char" else spelled)


def test_a_missing_text_file_is_one_line(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataSourceError) as e:
        run_data(dataset(name="text", path=str(missing)), 0)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
