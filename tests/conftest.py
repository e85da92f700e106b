import itertools
import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import settings

from dlstore.store.store import Store
from dlstore.zoo.builder import build_zoo
from dlstore.zoo.spec import ZooSpec
from tests.s3server import start_s3_server

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


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A local S3-compatible server (moto's server mode) on 127.0.0.1 with one bucket; yields a
    factory of fresh store URIs and the storage options that reach them. Shards read from it
    are cached under a temporary directory, not the user's cache."""
    try:
        server, options = start_s3_server("zoos")
    except ImportError as e:
        pytest.skip(f"no local S3 server: moto[server] cannot be imported ({e}); "
                    "pip install 'moto[server]' (part of the dev extra)")
    cache = os.environ.get("DLSTORE_CACHE")
    os.environ["DLSTORE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    names = itertools.count()
    yield S3(lambda: f"s3://zoos/store-{next(names)}", options)
    server.kill()
    server.wait()
    if cache is None:
        os.environ.pop("DLSTORE_CACHE")
    else:
        os.environ["DLSTORE_CACHE"] = cache


@dataclass
class S3:
    new_uri: Callable[[], str]
    options: dict[str, str]

    def cli_options(self) -> list[str]:
        return [arg for k, v in self.options.items() for arg in ("--storage-option", f"{k}={v}")]
