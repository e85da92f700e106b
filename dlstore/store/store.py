"""Store: the one object through which everything reads and writes a store.

    <store>/tables/<table>/        Delta Lake tables (Parquet + _delta_log)
    <store>/blobs/ab/cdef....safetensors   content-addressed cohort shards

Commit order makes crashes harmless: shards first (`put_shard`), then checkpoint and metric rows,
then the runs rows last (`commit`). A run exists for queries only once its runs row exists.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import polars as pl

from dlstore.errors import DataMismatchError, NotFoundError, QueryError, StoreError
from dlstore.store.blobs import BlobStore
from dlstore.store.catalog import Catalog
from dlstore.store.location import open_location
from dlstore.store.tables import Tables

if TYPE_CHECKING:  # torch is imported where weights are touched, so that SQL starts fast
    import torch
    from torch import nn

_MARKER = "dlstore.json"
# MULTI is what DuckDB makes of a PIVOT (an enum type in the in-memory catalog, then a select)
_READ_ONLY = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN,
              duckdb.StatementType.MULTI}
FORMAT_VERSION = 1


class Store:
    """A dlstore store: a local directory or an object-store URI (`s3://bucket/prefix`, ...).
    Use `dlstore.open(location, storage_options=...)`; `storage_options` are deltalake's names
    (`AWS_ENDPOINT_URL`, `AWS_REGION`, ...) and add to the usual environment variables."""

    def __init__(self, root: str | Path, create: bool = False,
                 storage_options: dict[str, str] | None = None):
        self.location = open_location(root, storage_options)
        self.root: Path | str = self.location.local_path("") or self.location.uri
        if not self.location.is_file(_MARKER):
            if not create:
                raise StoreError(f"store {self.root} {self._what_is_there()}; build a zoo into "
                                 "it first (dlstore build-zoo SPEC --store PATH)")
            self._initialise()
        self.blobs = BlobStore(self.location)
        self.tables = Tables(self.location)
        if create:
            self.tables.create_missing()
        self.catalog = Catalog(self.tables)

    @property
    def storage_options(self) -> dict[str, str]:
        """What another process needs, besides `root`, to open this store."""
        return self.location.storage_options

    def _what_is_there(self) -> str:
        local = self.location.local_path("")
        if local is not None:
            return "is a file, not a store" if local.is_file() else (
                "holds no dlstore store" if local.exists() else "does not exist")
        return "holds no dlstore store" if not self.location.is_empty() else "does not exist"

    def _initialise(self) -> None:
        if not self.location.is_empty():
            what = "directory" if self.location.local else "location"
            raise StoreError(f"{self.root} is a non-empty {what} that holds no dlstore store; "
                             f"choose an empty or new {what}")
        try:
            self.location.write_atomic(
                _MARKER, (json.dumps({"format": "dlstore", "version": FORMAT_VERSION}) + "\n")
                .encode())
        except OSError as e:
            raise StoreError(f"cannot create a store at {self.root}: {e}") from None

    # -- queries --------------------------------------------------------------------------

    def sql(self, query: str, params: list | None = None) -> pl.DataFrame:
        """Run a SQL query over the store's views (runs, checkpoints, metrics, final, curves,
        metrics_wide, zoos, fits) and return a polars DataFrame. `params` fill `?` placeholders."""
        con = self.catalog.refresh()
        try:
            statements = con.extract_statements(query)
        except duckdb.Error as e:
            raise QueryError(_one_line(e)) from None
        if len(statements) != 1:
            raise QueryError(f"give one query at a time, not {len(statements)} statements")
        kind = statements[0].type
        if kind not in _READ_ONLY:
            raise QueryError(f"{kind.name} statements are refused: SQL over a store only reads "
                             "(SELECT, WITH, PIVOT, DESCRIBE, SUMMARIZE, EXPLAIN)")
        try:
            relation = con.sql(query, params=params)
        except duckdb.Error as e:
            raise QueryError(_one_line(e)) from None
        if relation is None:
            raise QueryError("the statement returned no rows; dlstore sql answers queries only")
        try:
            return relation.pl()
        except duckdb.Error as e:
            raise QueryError(_one_line(e)) from None

    def runs(self, zoo: str | None = None) -> pl.DataFrame:
        if zoo is None:
            return self.sql("SELECT * FROM runs ORDER BY zoo, run_id")
        return self.sql("SELECT * FROM runs WHERE zoo = ? ORDER BY run_id", [zoo])

    def run(self, run_id: str) -> dict:
        """The runs row of one run, as a dict."""
        rows = self._lookup("SELECT * FROM runs WHERE run_id = ?", [run_id])
        if not rows:
            raise NotFoundError(f"no run {run_id!r} in store {self.root}")
        return rows[0]

    def run_ids(self) -> set[str]:
        return {r["run_id"] for r in self._lookup("SELECT run_id FROM runs", [])}

    def _lookup(self, query: str, params: list) -> list[dict]:
        # through Arrow/polars: DuckDB's own fetchall() needs pytz for timestamp columns
        return self.catalog.refresh().sql(query, params=params).to_arrow_table().to_pylist()

    # -- checkpoints ----------------------------------------------------------------------

    def checkpoint(self, run_id: str, step: int | None = None) -> dict:
        """The checkpoints row of (run_id, step); step None = the run's last checkpoint."""
        run = self.run(run_id)
        step = run["final_step"] if step is None else step
        rows = self._lookup("SELECT * FROM checkpoints WHERE run_id = ? AND step = ?",
                            [run_id, step])
        if not rows:
            steps = [r["step"] for r in self._lookup(
                "SELECT step FROM checkpoints WHERE run_id = ? ORDER BY step", [run_id])]
            raise NotFoundError(f"run {run_id} has no checkpoint at step {step}; "
                                f"its checkpoints are at steps {steps}")
        return rows[0]

    def load_state_dict(self, run_id: str, step: int | None = None) -> dict[str, torch.Tensor]:
        row = self.checkpoint(run_id, step)
        return self.blobs.read_member(row["blob"], row["member"])

    def load_model(self, run_id: str, step: int | None = None) -> nn.Module:
        """The run's network at `step` (None = last checkpoint), in eval mode, on the CPU."""
        from dlstore.zoo.models import parse_arch_options

        run = self.run(run_id)
        config = json.loads(run["config"])
        model = parse_arch_options(config["model"]).build(tuple(run["input_shape"]),
                                                          run["n_classes"])
        model.load_state_dict(self.load_state_dict(run_id, step))
        return model.eval()

    def load_dataset(self, run_id: str) -> dict[str, torch.Tensor]:
        """The tensors the run trained on (its subset, its label noise) and was evaluated on,
        regenerated and checked against the fingerprint recorded at training time."""
        from dlstore.zoo.data import parse_dataset_options, run_data

        run = self.run(run_id)
        config = json.loads(run["config"])
        data = run_data(parse_dataset_options(config["dataset"]), config["seed"])
        if data.fingerprint != run["data_hash"]:
            raise DataMismatchError(
                f"regenerated data for run {run_id} differs from what it trained on (a dataset "
                "generator changed since it was built); its weights are intact")
        # copies: the generated tensors are shared with an in-process cache
        return {"x_train": data.x_train.clone(), "y_train": data.y_train.clone(),
                "x_test": data.x_test.clone(), "y_test": data.y_test.clone()}

    # -- writing (the builder's side) -----------------------------------------------------

    def check_writable(self) -> None:
        """StoreError unless shards can be written: checked before a build trains anything."""
        self.blobs.check_writable()

    def put_shard(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
        return self.blobs.put(tensors, metadata)

    def commit(self, checkpoints: list[dict], metrics: list[dict] | dict[str, list],
               runs: list[dict]) -> str:
        """Append checkpoint and metric rows, then the runs rows last, all stamped with one
        commit id, which is returned. `metrics` may be rows or columns."""
        commit_id = uuid.uuid4().hex
        now = dt.datetime.now(dt.timezone.utc)
        for row in checkpoints:
            row["commit_id"] = commit_id
        for row in runs:
            row["commit_id"] = commit_id
            row.setdefault("created_at", now)
        if isinstance(metrics, dict):
            metrics = {**metrics, "commit_id": [commit_id] * len(metrics["run_id"])}
        else:
            for row in metrics:
                row["commit_id"] = commit_id
        self.tables.append("checkpoints", checkpoints)
        self.tables.append("metrics", metrics)
        self.tables.append("runs", runs)
        return commit_id

    def record_fit(self, row: dict) -> str:
        """Append an analysis result to the fits table; returns its fit id."""
        row = {"fit_id": uuid.uuid4().hex[:16], "created_at": dt.datetime.now(dt.timezone.utc),
               **row}
        self.tables.append("fits", [row])
        return row["fit_id"]

    def record_zoo(self, row: dict) -> bool:
        """Add a zoos row unless this exact spec text is already recorded for the zoo."""
        seen = self._lookup("SELECT 1 FROM zoos WHERE zoo = ? AND spec_hash = ?",
                            [row["zoo"], row["spec_hash"]])
        if seen:
            return False
        self.tables.append("zoos", [{"created_at": dt.datetime.now(dt.timezone.utc), **row}])
        return True


def open(path: str | Path,  # noqa: A001 - mirrors dlstore.open
         storage_options: dict[str, str] | None = None) -> Store:
    """Open the store at a local path or object-store URI (StoreError if there is none)."""
    return Store(path, storage_options=storage_options)


def _one_line(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    return " ".join(lines[:3])
