"""A 10,000-run zoo's report in a browser: page size, time to write it, time to interactive.

    python bench/report_load.py                      # 10,000 runs x 8 steps x 4 metrics
    python bench/report_load.py --runs 1000 --loads 2

The runs are logged with `Store.track` (no training: configs over width x lr x weight decay x
seeds, 4 whole-model metrics at each of 8 steps), then `dlstore report` writes the page and
headless Debian chromium (Playwright, `/usr/bin/chromium`) opens it from file:// with the
network off, `--loads` times. Time to interactive is the page's own `window.dlstoreReady`
(`performance.now()` when every chart of the first zoo has drawn and the runs table is filled,
so from the start of navigation) and, beside it, the wall time of `page.goto` until then.

Beside it, the same data drawn with Plotly instead of Vega-Lite, in one minimal page each
(runs table, a scatter of every run's final test accuracy, 5 runs' curves, a heat map; both
inline their library), to show why the report uses Vega-Lite; skipped where plotly is not
installed (`pip install plotly`, bench-only). Prints a table; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
STEPS = (0, 50, 100, 200, 400, 800, 1600, 3200)
WIDTHS, LRS, DECAYS = (8, 16, 32, 64, 128), (0.003, 0.01, 0.03, 0.1, 0.3), (0.0, 1e-4, 1e-3, 1e-2)


def make_store(root: Path, runs: int) -> None:
    import dlstore

    store = dlstore.open(root, create=True)
    rng = random.Random(0)
    grid = [(w, lr, wd) for w in WIDTHS for lr in LRS for wd in DECAYS]
    for i in range(runs):
        width, lr, wd = grid[i % len(grid)]
        config = {"width": width, "lr": lr, "weight_decay": wd, "seed": i // len(grid),
                  "n_params": 50 * width, "optimizer": "sgd"}
        with store.track("bench10k", config) as run:
            skill = 0.5 + 0.4 * (width / 128) ** 0.3 - abs(lr - 0.03) - 5 * wd
            for k, step in enumerate(STEPS):
                t = (k + 1) / len(STEPS)
                noise = rng.gauss(0, 0.01)
                run.log(step, train_loss=2.3 * (1 - t * skill) + noise,
                        test_loss=2.35 * (1 - t * skill) + noise,
                        train_acc=0.1 + t * skill + noise, test_acc=0.1 + t * skill * 0.95 + noise)
    store.close()


def open_times(browser, url: str, loads: int) -> list[tuple[float, float]]:
    """(window.dlstoreReady in ms, wall seconds of goto until ready) per load."""
    out = []
    for _ in range(loads):
        context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
        start = time.perf_counter()
        page.goto(url)
        page.wait_for_function("window.dlstoreReady !== undefined", timeout=60_000)
        out.append((page.evaluate("window.dlstoreReady"), time.perf_counter() - start))
        if errors:
            raise SystemExit(f"the page raised: {errors[0]}")
        context.close()
    return out


def plotly_page(data: dict, path: Path) -> bool:
    """The minimal Plotly page of the same runs; False where plotly is not installed."""
    try:
        import plotly
    except ImportError:
        return False
    library = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_text()
    zoo = data["zoos"][0]
    script = (Path(__file__).parent / "report_load_plotly.js").read_text()
    payload = json.dumps({"runs": zoo["runs"], "curves": zoo["curves"]}).replace("</", "<\\/")
    library = library.replace("</script", "<\\/script")
    path.write_text(f"<!doctype html><html><head><meta charset=utf-8><link rel=icon href='data:,'>"
                    f"<script>{library}</script></head><body>"
                    f"<div id=a></div><div id=b></div><div id=c></div><table id=t></table>"
                    f"<script id=d type='application/json'>{payload}</script>"
                    f"<script>{script}</script></body></html>")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="Keep the store and pages in this directory.")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from dlstore.report.page import render, report_data
    from dlstore.store.store import Store

    work = args.keep or Path(tempfile.mkdtemp(prefix="report-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    root = work / "store"
    start = time.perf_counter()
    if not root.exists():
        make_store(root, args.runs)
    log_s = time.perf_counter() - start
    page = work / "report.html"
    start = time.perf_counter()  # the command a user runs, in its own process
    subprocess.run([sys.executable, "-m", "dlstore.cli", "report", "--store", str(root),
                    "--out", str(page), "--force"], check=True, capture_output=True)
    write_s = time.perf_counter() - start
    data = report_data(Store(root))
    (n_runs,) = {len(data["zoos"][0]["runs"]["data"][0])}
    alternative = work / "plotly.html"
    has_plotly = plotly_page(data, alternative)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        vega = open_times(browser, page.as_uri(), args.loads)
        other = open_times(browser, alternative.as_uri(), args.loads) if has_plotly else None
        browser.close()
    assert len(render(data)) > 0
    result = {
        "runs": n_runs, "log_seconds": round(log_s, 1), "report_seconds": round(write_s, 2),
        "page_mb": round(page.stat().st_size / 1e6, 2),
        "ready_ms": [round(r) for r, _ in vega], "goto_s": [round(w, 2) for _, w in vega],
        "ready_ms_median": round(statistics.median(r for r, _ in vega)),
    }
    print(f"{n_runs:,} runs logged in {log_s:.1f} s; `dlstore report` (a fresh process) "
          f"{write_s:.2f} s -> {result['page_mb']:.2f} MB")
    print(f"{'page':<28} {'MB':>6} {'ready (ms), each load':>28} {'median':>8}")
    print(f"{'report (Vega-Lite)':<28} {result['page_mb']:>6.2f} "
          f"{', '.join(map(str, result['ready_ms'])):>28} {result['ready_ms_median']:>8}")
    if other:
        result["plotly_mb"] = round(alternative.stat().st_size / 1e6, 2)
        result["plotly_ready_ms"] = [round(r) for r, _ in other]
        median = statistics.median(r for r, _ in other)
        print(f"{'minimal page (Plotly)':<28} {result['plotly_mb']:>6.2f} "
              f"{', '.join(map(str, result['plotly_ready_ms'])):>28} {round(median):>8}")
        print(f"Plotly / report: size {result['plotly_mb'] / result['page_mb']:.1f}x, "
              f"ready {median / result['ready_ms_median']:.1f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
