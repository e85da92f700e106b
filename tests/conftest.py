import itertools
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import settings

# The example plugin (tests/plugins/dlstore_example_plugin) lives outside the package: its
# directory goes on the path, where its committed .dist-info declares its entry points as
# `pip install` would, before anything reads the registries (test parameters list them), and
# into PYTHONPATH for the subprocesses the tests start.
PLUGIN_DIR = os.path.join(os.path.dirname(__file__), "plugins", "dlstore_example_plugin")
sys.path.insert(0, PLUGIN_DIR)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (PLUGIN_DIR, os.environ.get("PYTHONPATH"))
                                           if p)

from dlstore.building.build import build_zoo  # noqa: E402
from dlstore.spec import ZooSpec  # noqa: E402
from dlstore.store.store import Store  # noqa: E402
from tests.s3server import start_s3_server  # noqa: E402

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
