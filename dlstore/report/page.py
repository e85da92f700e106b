"""One self-contained HTML page from a store's report data: every script and style inlined, so
the page opens from a file with no network.

Charts are Vega-Lite, drawn by the Vega, Vega-Lite and Vega-Embed bundle that the
`vl-convert-python` wheel builds offline (`vl_convert.javascript_bundle()`, about 0.9 MB).
Chosen by measurement against Plotly's `plotly.min.js` (4.8 MB) on a 10,000-run page: 1.9 MB
and 0.6-0.9 s to interactive, against 5.8 MB and 2.0-2.5 s (README, "Report and server").
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
from importlib import resources

from dlstore.errors import UsageError
from dlstore.report import queries
from dlstore.store.location import cache_dir
from dlstore.store.store import Store


def report_data(store: Store, zoos: list[str] | None = None) -> dict:
    """Everything the page shows, per zoo, as JSON-ready values."""
    names = queries.zoo_names(store, zoos)
    return {
        "store": str(store.root),
        "zoos": [{
            "summary": queries.summary(store, zoo),
            "runs": queries.runs_table(store, zoo),
            "curves": queries.curves(store, zoo),
            "phases": queries.phase_diagram(store, zoo),
            "tickets": queries.tickets(store, zoo),
            "recipes": queries.recipes(store, zoo),
        } for zoo in names],
        "fits": queries.fits(store),
    }


@functools.cache
def vega_bundle() -> str:
    """Vega, Vega-Lite and Vega-Embed as one script. Bundling takes 1.5-5 s, so the result is
    kept in the dlstore cache ($DLSTORE_CACHE) under the version of vl-convert that made it."""
    try:
        import vl_convert
    except ImportError as e:
        raise UsageError(f"the report draws its charts with Vega-Lite from vl-convert-python, "
                         f"which cannot be imported ({e}); pip install vl-convert-python") from None
    kept = cache_dir() / f"vega-bundle-{getattr(vl_convert, '__version__', 'unknown')}.js"
    try:
        return kept.read_text()
    except (OSError, UnicodeDecodeError):
        pass
    bundle = vl_convert.javascript_bundle()
    try:  # a cache that cannot be written only costs the next report the same seconds
        kept.parent.mkdir(parents=True, exist_ok=True)
        temporary = kept.with_name(f".{kept.name}.{os.getpid()}.tmp")
        temporary.write_text(bundle)
        os.replace(temporary, kept)
    except OSError:
        pass
    return bundle


def _asset(name: str) -> str:
    return resources.files("dlstore.report").joinpath("assets", name).read_text()


def _script_text(text: str) -> str:
    """Text safe inside a <script> element: no `</script` can end it early (`<\\/` means `</`
    in JSON strings, JavaScript strings and regular expressions alike)."""
    return re.sub(r"</(script)", r"<\\/\1", text, flags=re.IGNORECASE)


def render(data: dict, live: bool = False, title: str | None = None) -> str:
    """The page. `live`: served by `dlstore serve`, with the SQL box and a poll for commits."""
    payload = json.dumps({**data, "live": live}, separators=(",", ":"), allow_nan=False)
    title = title or f"dlstore report: {', '.join(z['summary']['zoo'] for z in data['zoos'])}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{html.escape(title)}</title>
<style>{_asset("report.css")}</style>
</head><body>
<header><h1>{html.escape(title)}</h1><p class="store">store: {html.escape(data["store"])}</p>
<nav id="zoo-tabs"></nav></header>
<main id="app"><p id="loading">loading...</p></main>
<script id="dlstore-data" type="application/json">{_script_text(payload)}</script>
<script>{_script_text(vega_bundle())}</script>
<script>{_script_text(_asset("report.js"))}</script>
</body></html>
"""


def error_page(message: str, status: int) -> str:
    """The error panel a server answers a bad request with: one line, never a traceback."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">
<title>dlstore: error {status}</title>
<style>{_asset("report.css")}</style></head><body>
<main><div class="panel error-panel" role="alert"><h2>error {status}</h2>
<p class="error-message">{html.escape(message)}</p>
<p><a href="/">back to the report</a></p></div></main></body></html>
"""
