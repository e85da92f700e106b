"""Stores and a browser for the report's tests: a small zoo with seed groups (a phase diagram
and heat maps), a real scaling fit of it in the fits table, and Debian's chromium driven by
Playwright (no browser download)."""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest

from dlstore.building.build import build_zoo
from dlstore.cli import main
from dlstore.spec import ZooSpec
from dlstore.store.store import Store

# 4 widths x 2 learning rates x 2 seeds, with group metrics: every panel but the tickets' has
# data (about 10 s to build on 2 cores)
PHASES_SPEC = textwrap.dedent("""
    name = "ph"
    seeds = 2
    checkpoints = [0, 20, 40]
    [dataset]
    name = "gaussian_mixture"
    n_samples = 400
    [model]
    arch = "mlp"
    depth = 1
    [train]
    lr = 0.05
    batch_size = 32
    steps = 40
    [grid]
    model.width = [4, 8, 16, 32]
    train.lr = [0.05, 0.5]
    [metrics]
    statistics = false
    spectra = false
    groups = { at = "last", points = 3, pairs = 1 }
""")
FIT_QUERY = ("SELECT n_params AS x, avg(value) AS loss FROM final WHERE zoo = 'ph' "
             "AND metric = 'test_loss' GROUP BY n_params ORDER BY n_params")
WSL_QUERY = "SELECT run_id, step FROM checkpoints WHERE step = 40"
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# where the screenshots go: $DLSTORE_SCREENSHOTS, else the test's pytest tmp directory
SCREENSHOTS = os.environ.get("DLSTORE_SCREENSHOTS")


@pytest.fixture(scope="session")
def phases_store(tmp_path_factory) -> Store:
    """A store of the `ph` zoo with a power-law fit of its test loss against n_params and a
    weight-space fit of its test accuracy. Tests must not modify it."""
    path = tmp_path_factory.mktemp("report") / "s"
    store = Store(path, create=True)
    build_zoo(ZooSpec.from_text(PHASES_SPEC), store, device="cpu")
    figures = tmp_path_factory.mktemp("fit")
    for argv in (["fit", "scaling", "--query", FIT_QUERY, "--x", "x", "--y", "loss",
                  "--bootstrap", "20", "--label", "ph-width", "--plot", str(figures / "s.png")],
                 ["wsl", "fit", "--query", WSL_QUERY, "--target", "test_acc", "--label",
                  "ph-wsl", "--plot", str(figures / "w.png")]):
        try:
            main([*argv, "--store", str(path), "--format", "json"])
        except SystemExit as e:
            assert e.code in (0, None)
    return Store(path)


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium. Skips (with the reason) where it is not installed, except in
    CI, which installs it (`make browser`) and must run these tests."""
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        reason = ("Debian's chromium is not installed (/usr/bin/chromium): run `make browser` "
                  "or apt-get install chromium")
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must run the browser tests")
        pytest.skip(reason)
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM if os.path.exists(CHROMIUM)
                                      else shutil.which("chromium"), args=BROWSER_ARGS)
        yield chromium
        chromium.close()


class Page:
    """A browser page that records console errors, uncaught exceptions and every request."""

    def __init__(self, browser, offline: bool):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900},
                                           offline=offline)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def open(self, url: str) -> None:
        self.page.goto(url)
        self.page.wait_for_function("window.dlstoreReady !== undefined", timeout=20_000)

    def screenshot(self, directory: Path, name: str) -> Path:
        folder = Path(SCREENSHOTS) if SCREENSHOTS else directory
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="session")
def tickets_store(tmp_path_factory) -> Store:
    """tests/test_tickets.py's small tickets zoo (32 runs: tickets, controls, stability copies,
    a transfer to Adam). Tests must not modify it."""
    from tests.test_tickets import TICKET_SPEC

    store = Store(tmp_path_factory.mktemp("report-tickets") / "s", create=True)
    build_zoo(ZooSpec.from_text(TICKET_SPEC), store, device="cpu")
    return store
