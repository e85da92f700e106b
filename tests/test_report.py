"""`dlstore report` without a browser: what the page holds, that each panel's SQL gives its rows
back through `dlstore sql`'s surface, and one-line errors for bad input. The page in a real
browser, and `dlstore serve`: tests/test_report_browser.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import pytest

from dlstore.cli import main
from dlstore.errors import NotFoundError
from dlstore.report import queries
from dlstore.report.page import render, report_data
from dlstore.store.store import Store
from tests import report_fixtures
from tests.report_fixtures import FIT_QUERY

# fixtures shared with the browser tests
phases_store = report_fixtures.phases_store
tickets_store = report_fixtures.tickets_store


def _embedded(html: str) -> dict:
    match = re.search(r'<script id="dlstore-data" type="application/json">(.*?)</script>',
                      html, re.S)
    return json.loads(match.group(1))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlstore.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_the_page_is_self_contained_and_holds_every_run(built_store, tmp_path):
    out = tmp_path / "r.html"
    done = _cli("report", "--store", str(built_store.root), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"-> {out}" in done.stdout and "8 runs" in done.stdout
    html = out.read_text()
    # nothing is fetched: outside the inline scripts no element points anywhere (the icon is
    # an empty data: URI, so that a browser asks for no favicon)
    markup = re.sub(r"(<script[^>]*>).*?</script>", r"\1</script>", html, flags=re.S)
    assert markup.count("<script") == 3
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=[\"'](?!data:)", markup,
                         re.I)
    assert "vegaEmbed" in html
    data = _embedded(html)
    zoo = data["zoos"][0]
    assert zoo["summary"]["zoo"] == "tiny" and zoo["summary"]["facts"]["runs"] == 8
    assert zoo["summary"]["facts"]["complete"] == 8
    assert zoo["summary"]["facts"]["origin"] == "built"
    assert 'name = "tiny"' in zoo["summary"]["spec"]
    ids = zoo["runs"]["data"][zoo["runs"]["columns"].index("run_id")]
    assert sorted(ids) == sorted(built_store.run_ids())
    assert {"test_acc", "train_loss"} <= set(zoo["runs"]["metrics"])
    assert data["fits"] is None and zoo["phases"] is None and zoo["tickets"] is None


def test_each_panels_sql_gives_its_rows_back(built_store):
    table = queries.runs_table(built_store, "tiny")
    again = built_store.sql(table["sql"])
    assert again.height == 8
    for column in ("run_id", "test_acc"):
        values = table["data"][table["columns"].index(column)]
        assert [queries.rounded(v) for v in again[column].to_list()] == values
    curves = queries.curves(built_store, "tiny")
    rows = built_store.sql(curves["sql"])
    per_metric = {m: sum(len(s[3]) for s in entries) for m, entries in curves["series"].items()}
    assert per_metric == dict(rows.group_by("metric").len().iter_rows())
    summary = queries.summary(built_store, "tiny")
    counts = built_store.sql(summary["sql"][1]).row(0, named=True)
    assert counts["checkpoints"] == summary["facts"]["checkpoints"] > 0


def test_a_zoo_with_groups_and_a_fit_has_a_phase_diagram_and_the_fit(phases_store):
    data = report_data(phases_store)
    zoo = data["zoos"][0]
    phases = zoo["phases"]
    assert (phases["x"], phases["y"]) == ("width", "lr")
    cells = len(phases["data"][0])
    assert cells == 8  # 4 widths x 2 learning rates
    labels = phases["data"][phases["columns"].index("phase")]
    assert set(labels) <= {"I", "II", "III", "IV-A", "IV-B"} and all(labels)
    assert phases_store.sql(phases["sql"]).height == cells
    (fit,) = data["fits"]["scaling"]
    assert fit["kind"] == "power_law" and fit["label"] == "ph-width"
    assert set(fit["params"]) == {"E", "A", "alpha"} and set(fit["ci"]) == {"E", "A", "alpha"}
    assert fit["query"] == FIT_QUERY and fit["points"]["names"] == ["x", "loss"]
    assert len(fit["points"]["data"][0]) == 4
    # 4 widths: the double-descent figure (error against width) has what it needs
    (recipe,) = zoo["recipes"]
    assert recipe["recipe"] == "double-descent" and recipe["x"] == "width"
    assert recipe["data"][recipe["columns"].index("width")] == [4, 8, 16, 32]
    assert phases_store.sql(recipe["sql"]).height == 4
    (wsl,) = data["fits"]["wsl"]
    assert wsl["label"] == "ph-wsl" and wsl["params"]["target"] == "test_acc"
    assert -1 <= wsl["params"]["kendall_tau"] <= 1 and wsl["params"]["n_test_runs"] >= 1
    json.dumps(data, allow_nan=False)  # every value the page embeds is valid JSON


def test_named_zoos_only_and_unknown_zoos_are_refused(built_store):
    assert [z["summary"]["zoo"] for z in report_data(built_store, ["tiny"])["zoos"]] == ["tiny"]
    with pytest.raises(NotFoundError, match="no zoo 'nope' in the store; its zoos: tiny"):
        report_data(built_store, ["nope"])


def test_sql_literals_are_inlined_as_the_text_that_runs(built_store):
    assert queries.inline("SELECT ? AS a, ? AS b, ? AS c", ["it's", 2, None]) == \
        "SELECT 'it''s' AS a, 2 AS b, NULL AS c"
    text = queries.inline("SELECT count(*) AS n FROM runs WHERE zoo = ?", ["tiny"])
    assert built_store.sql(text)["n"][0] == 8


def test_script_text_cannot_close_its_element():
    data = {"store": "s</script><script>alert(1)</script>", "zoos": [], "fits": None}
    html = render(data, title="t")
    assert html.count("</script>") == 3  # the data, the bundle and the page's own script


@pytest.mark.parametrize("args, message", [
    (["--out", "{tmp}/missing/r.html"], "directory {tmp}/missing does not exist"),
    (["--out", "{tmp}/r.txt"], "give a file ending in .html"),
    (["--out", "{tmp}/r.html", "--zoo", "nope"], "no zoo 'nope' in the store"),
    (["--out", "{tmp}/exists.html"], "exists; give --force to overwrite it"),
])
def test_bad_input_is_one_line(built_store, tmp_path, capsys, args, message):
    (tmp_path / "exists.html").write_text("mine")
    args = [a.format(tmp=tmp_path) for a in args]
    _refused(["report", "--store", str(built_store.root), *args], message.format(tmp=tmp_path),
             capsys)
    assert (tmp_path / "exists.html").read_text() == "mine"


def test_a_missing_store_is_one_line(tmp_path, capsys):
    _refused(["report", "--store", str(tmp_path / "none"), "--out", str(tmp_path / "r.html")],
             "does not exist", capsys)


def _refused(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1 and message in err, err


def test_a_tickets_zoo_has_accuracy_by_density_and_the_transfer_matrix(tickets_store):
    tickets = report_data(tickets_store)["zoos"][0]["tickets"]
    density = dict(zip(tickets["density"]["columns"], tickets["density"]["data"]))
    assert {"dense", "ticket", "reinit", "random_mask"} <= set(density["kind"])
    assert set(density["level"]) == {0, 1, 2}
    assert tickets_store.sql(tickets["density"]["sql"]).height == len(density["kind"])
    transfer = dict(zip(tickets["transfer"]["columns"], tickets["transfer"]["data"]))
    assert set(zip(transfer["source_condition"], transfer["target_condition"])) == {
        ("base", "adam")}
    assert all(0 <= v <= 1 for v in transfer["transferred"])


def test_tracked_runs_without_a_spec_and_with_nan_values(tmp_path):
    store = Store(tmp_path / "s", create=True)
    with warnings.catch_warnings():  # tracking warns once of the non-finite value
        warnings.simplefilter("ignore")
        for lr in (0.1, 10.0):
            with store.track("mine", {"lr": lr, "seed": 0}) as run:
                for step in range(3):
                    run.log(step, train_loss=float("nan") if lr > 1 else 1.0 / (step + 1))
    data = report_data(store)
    (zoo,) = data["zoos"]
    assert zoo["summary"]["spec"] is None
    assert zoo["summary"]["facts"]["origin"] == "tracked"
    assert zoo["summary"]["facts"]["runs"] == 2 and zoo["summary"]["facts"]["checkpoints"] == 0
    losses = dict(zip(*(zoo["runs"]["data"][zoo["runs"]["columns"].index(c)]
                        for c in ("lr", "train_loss"))))
    assert losses == {0.1: pytest.approx(1 / 3), 10.0: None}  # NaN is null in the page
    assert "NaN" not in render(data).split('<script id="dlstore-data"')[1].split("</script>")[0]


def test_an_imported_zoo_says_where_it_came_from(tmp_path):
    from dlstore.importers import import_zoo

    path = tmp_path / "summary.csv"
    path.write_text("model,epoch,width,test_acc\n" + "".join(
        f"m{m},{epoch},{2 * (m + 1)},{0.1 * (epoch + 1):.1f}\n"
        for m in range(2) for epoch in range(3)))
    store = Store(tmp_path / "s", create=True)
    import_zoo(store, "csv", path, zoo="published")
    (zoo,) = report_data(store)["zoos"]
    assert zoo["summary"]["facts"]["origin"] == f"imported (csv from {path})"
    assert zoo["summary"]["facts"]["runs"] == 2 and zoo["summary"]["facts"]["metric_rows"] == 6
