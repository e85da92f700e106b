"""The winning-ticket signature on MNIST-1D (slow: minutes on a CPU; `make test-slow`).

Known from Frankle & Carbin 2019 and, on this dataset, from the MNIST-1D authors (an MLP
rewound to initialisation): at high sparsity, magnitude-pruned subnetworks rewound to their
initial weights keep the dense network's accuracy and beat the same masks on a fresh
initialisation and random masks of the same layer-wise density."""

import textwrap

import pytest

from dlstore.analysis.tickets import accuracy_by_density, signatures
from dlstore.building.build import build_zoo
from dlstore.spec import ZooSpec
from dlstore.store.store import Store

# zoo/tickets.toml made smaller: one rewind step, no transfer or stability, half the steps,
# 8 levels (18.5 % of the weights left), 2 seeds
SIGNATURE_SPEC = textwrap.dedent("""
    name = "signature"
    seeds = 2
    checkpoints = [0, 1000]
    [dataset]
    name = "mnist1d"
    [model]
    arch = "mlp"
    width = 100
    depth = 2
    [train]
    optimizer = "sgd"
    lr = 0.1
    momentum = 0.9
    batch_size = 100
    steps = 1000
    schedule = "cosine"
    [tickets]
    levels = 8
    rewind_steps = [0]
""")


@pytest.mark.slow
def test_sparse_rewound_tickets_match_dense_and_beat_their_controls(tmp_path):
    store = Store(tmp_path / "s", create=True)
    build_zoo(ZooSpec.from_text(SIGNATURE_SPEC), store, device="cpu")
    [sig] = signatures(store, "signature", max_density=0.2)
    assert sig.levels == [8]
    assert sig.ticket > sig.dense - 0.02
    assert sig.ticket > sig.reinit + 0.02 and sig.ticket > sig.random_mask + 0.02
    # and the controls fall behind the tickets as the density falls
    table = accuracy_by_density(store, "signature").sort("level")
    gaps = (table["ticket"] - table["reinit"]).to_list()
    assert gaps[-1] > gaps[0]
