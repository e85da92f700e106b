"""`dlstore serve`: the report's pages, live over a store, and a read-only SQL box.

The standard library's `http.server` (ThreadingHTTPServer) serves it: a local tool for one
researcher needs no framework, and nothing new is installed. Store reads are serialised by one
lock (a DuckDB connection is not shared across threads); the page is rebuilt when a table's
Delta version changes, which the page polls for (`/api/version`), so it follows a build's
commits. SQL goes through `Store.sql`, the same sandbox as `dlstore sql`.

Routes: `/` (the report; `?zoo=NAME`, repeatable, narrows it), `/api/sql?q=SQL` (JSON rows,
or {"error": "refused: ..."} for SQL that `dlstore sql` refuses), `/api/version`. Anything
else, or a query string that cannot be read, is an error panel; an error inside a request is
answered with one line, and the server keeps serving.
"""

from __future__ import annotations

import json
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from dlstore.errors import DlstoreError, NotFoundError, UsageError
from dlstore.report.page import error_page, render, report_data
from dlstore.report.queries import plain
from dlstore.store.store import Store

SQL_ROWS = 1000  # rows of a SQL answer sent to the page (the count says how many there were)
_PARAMETERS = {"/": {"zoo"}, "/api/sql": {"q"}, "/api/version": set()}


class BadRequest(DlstoreError):
    """A request the server cannot answer: said in one line on an error panel."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


class ReportServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: Store, host: str = "127.0.0.1", port: int = 8765):
        self.store = store
        self.lock = threading.Lock()
        self._pages: dict[tuple, str] = {}
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}; give another "
                             "--port (0 picks a free one)") from None

    def handle_error(self, request, client_address) -> None:
        """A connection the browser dropped is no news; anything else is one line on stderr,
        never socketserver's traceback."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            print(f"dlstore serve: request from {client_address[0]} failed: "
                  f"{type(error).__name__}: {error}", file=sys.stderr)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def version(self) -> str:
        """The tables' Delta versions: changes with every commit to the store."""
        with self.lock:
            return self.store.version()

    def page(self, zoos: list[str]) -> str:
        version = self.version()
        key = (version, tuple(zoos))
        with self.lock:
            if key not in self._pages:
                data = report_data(self.store, zoos or None)
                self._pages = {key: render({**data, "version": version}, live=True)}
            return self._pages[key]

    def sql(self, query: str) -> dict:
        if not query.strip():
            raise BadRequest("the query is empty: type SQL into the box")
        with self.lock:
            frame = self.store.sql(query)
        rows = [[plain(v) for v in row] for row in frame.head(SQL_ROWS).iter_rows()]
        return {"columns": frame.columns, "rows": rows, "n": frame.height}


class _Handler(BaseHTTPRequestHandler):
    server: ReportServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        try:
            path, params = self._route()
            if path == "/":
                self._send(HTTPStatus.OK, "text/html", self.server.page(params.get("zoo", [])))
            elif path == "/api/version":
                self._json(HTTPStatus.OK, {"version": self.server.version()})
            else:
                self._sql(params)
        except BadRequest as e:
            self._error(str(e), e.status)
        except NotFoundError as e:
            self._error(str(e), HTTPStatus.NOT_FOUND)
        except DlstoreError as e:
            self._error(str(e), HTTPStatus.BAD_REQUEST)
        except Exception as e:  # noqa: BLE001 - one line to the reader; the server goes on
            self._error(f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]}",
                        HTTPStatus.INTERNAL_SERVER_ERROR)

    def _route(self) -> tuple[str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        if parts.path not in _PARAMETERS:
            raise BadRequest(f"no page {parts.path}; the report is at /", HTTPStatus.NOT_FOUND)
        try:
            params = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query),
                              errors="strict") if parts.query else {}
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"malformed query string {parts.query[:200]!r}: {e}") from None
        unknown = set(params) - _PARAMETERS[parts.path]
        if unknown:
            allowed = ", ".join(sorted(_PARAMETERS[parts.path])) or "none"
            raise BadRequest(f"unknown parameter {', '.join(sorted(unknown))} for {parts.path} "
                             f"(parameters: {allowed})")
        if parts.path == "/" and any(not z for z in params.get("zoo", [])):
            raise BadRequest("zoo= needs a zoo name")
        return parts.path, params

    def _sql(self, params: dict[str, list[str]]) -> None:
        queries = params.get("q", [])
        if len(queries) != 1:
            raise BadRequest("give one query: /api/sql?q=SELECT ...")
        try:
            answer = self.server.sql(queries[0])
        except DlstoreError as e:
            # refused or wrong SQL is an answer, not a failed request: the page shows it in its
            # error panel (and the browser logs no failed load)
            self._json(HTTPStatus.OK, {"error": str(e)})
            return
        self._json(HTTPStatus.OK, answer)

    def _error(self, message: str, status: HTTPStatus) -> None:
        if urlsplit(self.path).path.startswith("/api/"):
            self._json(status, {"error": message})
        else:
            self._send(status, "text/html", error_page(message, status.value))

    def _json(self, status: HTTPStatus, value: dict) -> None:
        self._send(status, "application/json", json.dumps(value, allow_nan=False, default=str))

    def _send(self, status: HTTPStatus, kind: str, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's name
        """Quiet: the terminal shows where the server is, not every request."""
