import os
import textwrap

import pytest
from hypothesis import settings

from dlstore.store.store import Store
from dlstore.zoo.builder import build_zoo
from dlstore.zoo.spec import ZooSpec

# Property-based tests draw the same examples on every run, so that CI is reproducible; set
# HYPOTHESIS_PROFILE=explore to draw fresh ones.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# A zoo small enough to build in seconds: 2 widths x 2 lrs x 2 seeds on a Gaussian mixture.
TINY_SPEC = textwrap.dedent("""
    name = "tiny"
    seeds = 2
    checkpoints = "log:5"

    [dataset]
    name = "gaussian_mixture"
    n_samples = 600

    [model]
    arch = "mlp"
    depth = 1

    [train]
    lr = 0.05
    batch_size = 32
    epochs = 3

    [grid]
    model.width = [8, 16]
    train.lr = [0.05, 0.2]
""")


@pytest.fixture(scope="session")
def tiny_spec() -> ZooSpec:
    return ZooSpec.from_text(TINY_SPEC)


@pytest.fixture(scope="session")
def built_store(tmp_path_factory, tiny_spec):
    """A store holding the tiny zoo, built once per test session. Tests must not modify it."""
    store = Store(tmp_path_factory.mktemp("store") / "s", create=True)
    report = build_zoo(tiny_spec, store, device="cpu")
    assert report.runs_built == len(tiny_spec.runs) == 8
    return store
