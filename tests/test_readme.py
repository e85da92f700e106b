"""The README's Views table against the real views: every view listed, every column named, in
order (a renamed or added column fails here until the README says so)."""

import re
from pathlib import Path

from dlstore.schemas import HYPERPARAMETER_COLUMNS
from dlstore.store.catalog import _DEPENDS

README = Path(__file__).resolve().parent.parent / "README.md"
SHARED = [c for c in HYPERPARAMETER_COLUMNS if c not in ("run_id", "zoo", "status", "seed")]


def _top_level(cell: str) -> list[str]:
    """Items of a columns cell split at commas and '+' outside parentheses."""
    items, depth, current = [], 0, ""
    for ch in cell:
        depth += (ch == "(") - (ch == ")")
        if ch in ",+" and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    return [i for i in [*items, current.strip()] if i]


def readme_views() -> dict[str, tuple[list[str], bool]]:
    """view -> (columns the README names, whether it says more columns follow)."""
    text = README.read_text().split("\n## Views\n", 1)[1].split("\n## ", 1)[0]
    views = {}
    for line in text.splitlines():
        match = re.match(r"\| `(\w+)` \|[^|]*\| (.*) \|$", line)
        if not match:
            continue
        columns, open_ended = [], False
        for item in _top_level(match.group(2)):
            if "hyperparameter columns" in item:
                columns += SHARED if "shared" in item else list(HYPERPARAMETER_COLUMNS)
            elif item.startswith("one column per"):
                open_ended = True
            else:
                columns.append(re.match(r"[a-z_0-9]+", item).group(0))
        views[match.group(1)] = (columns, open_ended)
    return views


def test_readme_lists_every_view_with_its_real_columns(built_store):
    listed = readme_views()
    # views a user queries; `_runs_latest` is the runs view's materialized inside
    assert set(listed) == {v for v in _DEPENDS if not v.startswith("_")}
    for view, (columns, open_ended) in listed.items():
        real = built_store.sql(f"SELECT * FROM {view} LIMIT 0").columns
        if open_ended:
            assert real[:len(columns)] == columns, view
        else:
            assert real == columns, view


def test_the_parser_reads_what_the_table_says():
    cell = "run_id, config (JSON, full), the shared hyperparameter columns + step, tags (map)"
    assert [i.split()[0] for i in _top_level(cell)] == ["run_id", "config", "the", "step",
                                                        "tags"]
