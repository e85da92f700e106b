"""The report page and `dlstore serve` in a real browser: headless Debian chromium driven by
Playwright. From file:// with the network off: no console errors, nothing fetched, every run in
the table, filtering, one curve per ticked run, the phase diagram; over HTTP the same, plus the
SQL box (a writing statement refused in the page), a malformed query string answered with an
error panel, and the page following a commit. A screenshot of each page is saved (its path
printed: pytest -s shows it)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from dlstore.report.page import render, report_data
from dlstore.report.server import ReportServer
from dlstore.store.store import Store
from tests import report_fixtures
from tests.report_fixtures import Page

# fixtures shared with tests/test_report.py
browser = report_fixtures.browser
phases_store = report_fixtures.phases_store
tickets_store = report_fixtures.tickets_store

PHASES = {"I", "II", "III", "IV-A", "IV-B"}


@pytest.fixture(scope="module")
def report_file(phases_store, tmp_path_factory):
    path = tmp_path_factory.mktemp("page") / "report.html"
    path.write_text(render(report_data(phases_store)))
    return path


@pytest.fixture
def page(browser):
    opened = Page(browser, offline=True)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def server(phases_store):
    running = ReportServer(Store(phases_store.root), port=0)
    thread = threading.Thread(target=running.serve_forever, daemon=True)
    thread.start()
    yield running
    running.shutdown()
    running.server_close()


@pytest.fixture
def http_page(browser):
    opened = Page(browser, offline=False)
    yield opened
    opened.close()


def _rows(page) -> int:
    return page.locator(".runs-panel tbody tr").count()


def _check_report(page, n_runs: int) -> None:
    """What a reader sees first: every run, a filter that narrows, curves, a phase diagram."""
    p = page.page
    assert _rows(p) == n_runs
    assert p.locator(".runs-count").inner_text() == f"{n_runs} of {n_runs} runs"
    p.fill(".runs-filter", "lr=0.5")
    assert _rows(p) == n_runs // 2
    assert p.locator(".runs-count").inner_text() == f"{n_runs // 2} of {n_runs} runs"
    one = p.locator(".runs-panel tbody tr").first.get_attribute("data-run")
    p.fill(".runs-filter", one[-6:])
    assert _rows(p) == 1
    p.fill(".runs-filter", "")
    assert _rows(p) == n_runs
    # the phase diagram: one cell per grid point, each labelled with a phase
    cells = int(p.get_attribute(".phase-chart", "data-cells"))
    assert cells == 8 and p.locator(".phase-chart .mark-rect.role-mark path").count() == cells
    labels = p.locator(".phase-chart .mark-text.role-mark text").all_text_contents()
    assert len(labels) == cells and set(labels) <= PHASES
    # the double-descent recipe's figure: train and test error against width
    assert p.get_attribute(".recipe-chart", "data-traces") == "2"
    assert p.locator(".recipe-chart .mark-line.role-mark path").count() == 2
    # every panel shows its SQL
    panels = p.locator("section.panel:not(.sql-panel):visible")
    assert panels.count() >= 5
    for k in range(panels.count()):
        assert panels.nth(k).locator("pre.sql-text").count() >= 1


def _pick_runs(page, k: int) -> None:
    """Tick exactly the first k runs of the table."""
    p = page.page
    boxes = p.locator(".runs-panel tbody input.pick")
    for i in range(boxes.count()):
        boxes.nth(i).set_checked(i < k)


def _traces(page) -> tuple[int, int]:
    p = page.page
    p.wait_for_function("document.querySelector('.curves-chart svg') !== null")
    time.sleep(0.2)  # vega draws asynchronously after the data changes
    return (int(p.get_attribute(".curves-chart", "data-traces")),
            p.locator(".curves-chart .mark-line.role-mark path").count())


def test_report_from_a_file_with_no_network(page, report_file, phases_store, tmp_path):
    page.open(report_file.as_uri())
    assert page.errors == []
    assert {u for u in page.requests if not u.startswith("file://")} == set()
    _check_report(page, n_runs=len(phases_store.run_ids()))
    page.screenshot(tmp_path, "report-file")
    assert page.errors == []


def test_curves_draw_one_trace_per_ticked_run(page, report_file):
    page.open(report_file.as_uri())
    for k in (3, 1, 6):
        _pick_runs(page, k)
        assert _traces(page) == (k, k)
    # mean over seeds: one line per config (8 grid points), coloured by a hyperparameter
    page.page.select_option(".curves-panel select[name=mode]", "mean over seeds, coloured by")
    assert _traces(page) == (8, 8)
    page.page.select_option(".curves-panel select[name=mode]", "mean per value of")
    page.page.select_option(".curves-panel select[name=by]", "lr")
    assert _traces(page) == (2, 2)
    sql = page.page.locator(".curves-panel pre.sql-text").first.inner_text()
    assert sql.startswith("SELECT lr, step, avg(value) AS mean") and "zoo = 'ph'" in sql
    assert page.errors == []


def test_the_fits_tab_shows_the_scaling_and_weight_space_fits(page, report_file, tmp_path):
    page.open(report_file.as_uri())
    page.page.click("nav button[data-zoo=fits]")
    panel = page.page.locator(".scaling-panel")
    panel.locator(".scaling-chart svg").wait_for()
    assert "ph-width" in panel.locator("h2").inner_text()
    assert panel.locator(".scaling-chart .mark-symbol.role-mark path").count() == 4  # the 4 points
    assert panel.locator(".interval-chart .mark-rule.role-mark line").count() == 3  # E, A, alpha
    wsl = page.page.locator(".wsl-panel")
    assert "ph-wsl" in wsl.locator("table").inner_text()
    assert wsl.locator(".wsl-chart .mark-rect.role-mark path").count() == 1  # its score
    page.screenshot(tmp_path, "report-fits")
    assert page.errors == []


def test_the_server_serves_the_same_page_and_a_read_only_sql_box(http_page, server,
                                                                  phases_store, tmp_path):
    http_page.open(server.url)
    _check_report(http_page, n_runs=len(phases_store.run_ids()))
    p = http_page.page
    p.fill("#sql-input", "SELECT count(*) AS n FROM runs")
    p.click("#sql-run")
    p.locator("#sql-result table").wait_for()
    assert p.locator("#sql-result td").inner_text() == str(len(phases_store.run_ids()))
    for writing in ("CREATE TABLE x AS SELECT 1", "COPY runs TO '/tmp/x.csv'",
                    "SELECT 1; DROP VIEW runs"):
        p.fill("#sql-input", writing)
        p.click("#sql-run")
        p.locator("#sql-result .error-panel").wait_for()
        assert p.locator("#sql-result .error-message").inner_text().startswith("refused:")
    http_page.screenshot(tmp_path, "serve")
    assert http_page.errors == []
    assert phases_store.sql("SELECT count(*) AS n FROM runs")["n"][0] == len(
        phases_store.run_ids())


@pytest.mark.parametrize("query, status, message", [
    ("zoo=%ff", 400, "malformed query string"),
    ("zoo=a&&b", 400, "malformed query string"),
    ("colour=red", 400, "unknown parameter colour"),
    ("zoo=nope", 404, "no zoo 'nope' in the store"),
])
def test_a_bad_query_string_gets_an_error_panel(http_page, server, query, status, message,
                                                tmp_path):
    answer = http_page.page.goto(server.url + "?" + query)
    assert answer.status == status
    panel = http_page.page.locator(".error-panel .error-message")
    assert message in panel.inner_text() and "Traceback" not in http_page.page.content()
    if query == "zoo=%ff":
        http_page.screenshot(tmp_path, "serve-error")
    # and the server goes on serving
    assert http_page.page.goto(server.url + "?zoo=ph").status == 200


def test_the_page_follows_a_commit(http_page, server, phases_store):
    http_page.open(server.url)
    p = http_page.page
    p.evaluate("window.before_commit = true")
    run_id = sorted(phases_store.run_ids())[0]
    writer_side = Store(phases_store.root)
    writer_side.set_tags(run_id, {"seen": "yes"})  # a commit to the store
    try:
        p.wait_for_function("window.before_commit === undefined && window.dlstoreReady",
                            timeout=15_000)
    finally:
        writer_side.set_tags(run_id, {"seen": ""})
        writer_side.close()


def test_serve_says_where_it_listens(phases_store):
    process = subprocess.Popen([sys.executable, "-m", "dlstore.cli", "serve", "--store",
                                str(phases_store.root), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert line.startswith(f"serving {phases_store.root} on http://127.0.0.1:")
    assert "only this machine can reach it" in line


def test_a_tickets_zoo_draws_density_curves_and_the_transfer_matrix(page, tickets_store,
                                                                    tmp_path):
    path = tmp_path / "tickets.html"
    path.write_text(render(report_data(tickets_store)))
    page.open(path.as_uri())
    p = page.page
    # ticket, reinit, random_mask along the levels (dense is one point at level 0)
    kinds = p.locator(".tickets-chart .mark-line.role-mark path").count()
    assert kinds >= 3
    cells = p.locator(".transfer-chart .mark-rect.role-mark path").count()
    assert cells == 1  # base -> adam at the chosen level
    page.screenshot(tmp_path, "report-tickets")
    assert page.errors == []
