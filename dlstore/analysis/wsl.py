"""Weight-space learning: populations of trained weights as a dataset, and baselines on it.

    ds = WeightDataset(store, "SELECT run_id, step FROM checkpoints JOIN runs USING (run_id) "
                              "WHERE zoo = 'wsl'", target="test_acc", features="stats")
    result = fit_predictor(ds, model="gbm")      # Kendall's tau and R^2 on held-out runs

Features of one checkpoint:
- `flat`: its weights as one vector, in the order of `ds.layout` (`Store.weights`);
- `stats`: per tensor, mean, std and the 0/25/50/75/100 % quantiles (Unterthiner et al. 2020,
  "Predicting neural network accuracy from weights"), from `dlstore.metrics.weights`;
- `canonical`: the flat vector after sorting the hidden units of every layer by a
  permutation-invariant key (`canonicalize`), so that the networks that differ only by a
  permutation of hidden units -- which compute the same function -- get the same vector.

Targets are any column the query returns, any column of the `runs` view, any whole-model metric
at the row's step, or `generalization_gap` (train_acc - test_acc). Rows are split into train /
val / test by run, never by checkpoint (checkpoints of one run are near-duplicates, and a split
by checkpoint leaks), deterministically from a seed.

Everything here reads the store through `Store.sql` and `Store.weights`; nothing writes files
(exports live in `wsl_export.py`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset

from dlstore.errors import DlstoreError, LayoutError, NotFoundError, QueryError
from dlstore.layout import Layout
from dlstore.metrics.weights import STATISTICS, tensor_statistics
from dlstore.schemas import RUNS

if TYPE_CHECKING:
    from dlstore.store.store import Store

Features = Literal["flat", "stats", "canonical"]
FEATURES = ("flat", "stats", "canonical")
MODELS = ("linear", "gbm", "mlp")
TASKS = ("auto", "regression", "classification")
DEFAULT_SPLITS = {"train": 0.7, "val": 0.1, "test": 0.2}
GAP_TARGETS = ("generalization_gap", "generalisation_gap")
Params = dict[str, torch.Tensor]


class WeightSpaceError(DlstoreError):
    """A weight-space dataset or predictor asked for something its data cannot give."""


# -- permutation symmetry of hidden units --------------------------------------------------


@dataclass(frozen=True)
class HiddenLayer:
    """Hidden units whose order does not change the network's function: permuting axis 0 of
    `incoming` (their weights and biases, and any other per-unit tensor such as a norm's
    parameters and running statistics) together with axis 1 of every tensor of `outgoing` (the
    layers that read them: one for a chain, several for a residual stream; `block` consecutive
    columns per unit where channels are flattened into a linear layer) leaves every output
    unchanged."""

    units: int
    incoming: tuple[str, ...]
    outgoing: tuple[str, ...]
    block: int = 1


_MLP = re.compile(r"layers\.(\d+)\.(weight|bias)")
_CNN = re.compile(r"(?:convs\.(\d+)|out)\.(weight|bias)")


def hidden_layers(layout: Layout, arch=None) -> list[HiddenLayer]:
    """The permutable hidden layers of a network with this layout: as its architecture declares
    them (`Architecture.permutation_symmetries`), or, without one, those of an `mlp` or `cnn1d`
    read from the tensor names."""
    if arch is not None:
        return _declared_layers(layout, arch)
    layers = weight_bias_pairs(layout)
    names = layout.names
    if all(_MLP.fullmatch(n) for n in names):
        family = "mlp"
    elif all(_CNN.fullmatch(n) for n in names) and layers[-1][0] == "out.weight":
        family = "cnn1d"
    else:
        raise WeightSpaceError(f"permutation symmetries are known for the mlp and cnn1d "
                               f"families; this layout holds {names}")
    out = []
    for (weight, bias), (next_weight, _) in zip(layers[:-1], layers[1:]):
        units = layout[weight].shape[0]
        fan_in = layout[next_weight].shape[1]
        if fan_in % units:
            raise WeightSpaceError(f"{next_weight} takes {fan_in} inputs, not a multiple of the "
                                   f"{units} units of {weight} ({family})")
        out.append(HiddenLayer(units, (weight, bias), (next_weight,), fan_in // units))
    return out


def _declared_layers(layout: Layout, arch) -> list[HiddenLayer]:
    spec = arch.permutation_symmetries({e.name: e.shape for e in layout.entries})
    if spec is None:
        raise WeightSpaceError(f"architecture {arch.arch!r} does not declare "
                               "`permutation_symmetries`, which canonical features and "
                               "permutation augmentation need")
    out = []
    for incoming, outgoing in spec:
        readers = (outgoing,) if isinstance(outgoing, str) else tuple(outgoing)
        units = layout[incoming[0]].shape[0]
        blocks = set()
        for reader in readers:
            fan_in = layout[reader].shape[1]
            if fan_in % units:
                raise WeightSpaceError(f"{reader} takes {fan_in} inputs, not a multiple of the "
                                       f"{units} units of {incoming[0]} ({arch.arch})")
            blocks.add(fan_in // units)
        if len(blocks) != 1:
            raise WeightSpaceError(f"the readers {list(readers)} of the units of {incoming[0]} "
                                   f"take them in blocks of different sizes ({arch.arch})")
        out.append(HiddenLayer(units, tuple(incoming), readers, blocks.pop()))
    return out


def runs_architecture(store: Store, run_ids: Sequence[str]):
    """The architecture of the runs, which declares their permutation symmetries (the plugin
    that defines it must be importable); runs of several share one layout, so any will do."""
    from dlstore.architectures.registry import run_architecture

    row = store.sql("SELECT run_id, config FROM runs WHERE list_contains(?, run_id) LIMIT 1",
                    [sorted(set(run_ids))]).to_dicts()
    return run_architecture(row[0]) if row else None


def weight_bias_pairs(layout: Layout) -> list[tuple[str, str]]:
    """(weight, bias) of every layer, in order: the layout alternates them, as state dicts of
    the registered architectures do."""
    names = layout.names
    pairs = list(zip(names[0::2], names[1::2]))
    if len(names) % 2 or any(not w.endswith(".weight") or b != w.removesuffix("weight") + "bias"
                             for w, b in pairs):
        raise WeightSpaceError(f"expected layers of weight then bias; this layout holds {names}")
    return pairs


def permute_units(params: Mapping[str, torch.Tensor], layer: HiddenLayer,
                  perm: torch.Tensor) -> Params:
    """Permute one hidden layer's units in stacked params [n, ...]: unit j of member i becomes
    unit perm[i, j]'s old self. Returns new tensors for those it touches, the rest as is."""
    n = perm.shape[0]
    out = dict(params)
    for name in layer.incoming:
        t = params[name]
        out[name] = torch.take_along_dim(t, perm.reshape(n, -1, *[1] * (t.dim() - 2)), dim=1)
    columns = (perm[:, :, None] * layer.block
               + torch.arange(layer.block, device=perm.device)).reshape(n, -1)
    for name in layer.outgoing:
        t = params[name]
        out[name] = torch.take_along_dim(
            t, columns.reshape(n, 1, -1, *[1] * (t.dim() - 3)), dim=2)
    return out


def random_permutation(params: Mapping[str, torch.Tensor], layers: Sequence[HiddenLayer],
                       generator: torch.Generator | None = None) -> Params:
    """A random function-preserving permutation of every hidden layer of stacked params."""
    n = next(iter(params.values())).shape[0]
    device = next(iter(params.values())).device
    out = dict(params)
    for layer in layers:
        perm = torch.argsort(torch.rand(n, layer.units, generator=generator), dim=1)
        out = permute_units(out, layer, perm.to(device))
    return out


def canonicalize(params: Mapping[str, torch.Tensor], layers: Sequence[HiddenLayer]) -> Params:
    """Sort the hidden units of every layer, first to last, by the L2 norm of their incoming
    weights and bias (descending; ties broken by their sum). A unit's key does not depend on the
    order of the other units of any layer once the layers before it are sorted, so any
    permutation of hidden units maps to the same canonical parameters."""
    out = dict(params)
    for layer in layers:
        n = out[layer.incoming[0]].shape[0]
        rows = torch.cat([out[name].reshape(n, layer.units, -1) for name in layer.incoming], 2)
        rows = rows.to(torch.float64)
        norm, total = rows.norm(dim=2), rows.sum(dim=2)
        perm = torch.argsort(total, dim=1, descending=True, stable=True)
        perm = perm.gather(1, torch.argsort(norm.gather(1, perm), dim=1, descending=True,
                                            stable=True))
        out = permute_units(out, layer, perm)
    return out


def canonical_flat(flat: torch.Tensor, layout: Layout, arch=None) -> torch.Tensor:
    """Rows of flattened weights [n, d] -> their canonical form, same layout (`arch`: the
    architecture that declares the permutations; None = mlp / cnn1d by tensor names)."""
    layers = hidden_layers(layout, arch)
    return layout.flatten(canonicalize(layout.unflatten(flat), layers))


def stats_features(flat: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, list[str]]:
    """Rows of flattened weights [n, d] -> [n, 7 * tensors] float64: per tensor, the
    statistics of `dlstore.metrics.weights.tensor_statistics`, and their names."""
    columns, names = [], []
    for entry in layout.entries:
        stats = tensor_statistics(flat[:, entry.slice])
        for stat in STATISTICS:
            columns.append(stats[stat])
            names.append(f"{entry.name}.{stat}")
    return torch.stack(columns, 1), names


# -- the dataset ---------------------------------------------------------------------------


class WeightDataset(Dataset):
    """Checkpoints as examples: `ds[i]` is (features [f] float32, target), in the query's row
    order. `ds.frame` holds run_id, step and the target of every row; `ds.split("train")` the
    rows of the train runs. See the module docstring for features and targets.

    `task`: "auto" treats text and boolean targets as classes and numbers as a regression.
    `splits`: fractions of the runs per split (shares of the run count, rounded; every split
    with a positive share gets a run when there are enough). `augment`: `split(...,
    augment=True)` items are drawn under a fresh random permutation of hidden units (flat
    features only: the other two are invariant to it). `layout`: for flat and canonical
    features of runs of several shapes (`Store.weights`)."""

    def __init__(self, store: Store, query: str | pl.DataFrame, target: str = "test_acc",
                 features: Features = "flat", task: str = "auto",
                 splits: Mapping[str, float] | None = None, seed: int = 0,
                 layout: Layout | None = None, params: list | None = None,
                 batch_size: int = 4096):
        if features not in FEATURES:
            raise WeightSpaceError(f"unknown features {features!r}; use one of {FEATURES}")
        frame = query if isinstance(query, pl.DataFrame) else store.sql(query, params)
        if "run_id" not in frame.columns or "step" not in frame.columns:
            raise QueryError(f"a weight-space query must return run_id and step columns; it "
                             f"returned {frame.columns}")
        if frame.height == 0:
            raise QueryError("the query returned no checkpoints")
        values = target_values(store, frame, target)
        keys = frame.select("run_id", "step")
        self._arch = None
        if features == "stats":
            x, names = _pull_stats(store, keys, batch_size)
            pulled_layout = None
        else:
            self._arch = runs_architecture(store, keys["run_id"].to_list())
            flat, pulled_layout = store.weights(keys, layout=layout)
            x = (canonical_flat(flat, pulled_layout, self._arch) if features == "canonical"
                 else flat)
            names = [f"{e.name}[{i}]" for e in pulled_layout.entries for i in range(e.size)]
        self._setup(x, values, keys["run_id"].to_list(), keys["step"].to_list(), target, task,
                    splits, seed, names, features, pulled_layout)

    @classmethod
    def from_arrays(cls, features: np.ndarray | torch.Tensor, targets: Sequence | np.ndarray,
                    run_ids: Sequence[str], steps: Sequence[int] | None = None,
                    target: str = "target", task: str = "auto",
                    splits: Mapping[str, float] | None = None, seed: int = 0,
                    feature_names: Sequence[str] | None = None) -> WeightDataset:
        """A dataset of given feature rows (e.g. computed elsewhere), split by `run_ids`."""
        ds = cls.__new__(cls)
        ds._arch = None
        x = torch.as_tensor(np.asarray(features))
        if x.dim() != 2 or x.shape[0] != len(run_ids) or len(targets) != len(run_ids):
            raise WeightSpaceError(f"features must be [n, f] with one target and run id per row; "
                                   f"got {tuple(x.shape)}, {len(targets)} targets, "
                                   f"{len(run_ids)} run ids")
        steps = [0] * len(run_ids) if steps is None else list(steps)
        names = list(feature_names) if feature_names is not None else [
            f"x{i}" for i in range(x.shape[1])]
        ds._setup(x, pl.Series(target, list(targets)), list(run_ids), steps, target, task,
                  splits, seed, names, "given", None)
        return ds

    def _setup(self, x: torch.Tensor, values: pl.Series, run_ids: list[str], steps: list[int],
               target: str, task: str, splits: Mapping[str, float] | None, seed: int,
               names: list[str], features: str, layout: Layout | None) -> None:
        if task not in TASKS:
            raise WeightSpaceError(f"unknown task {task!r}; use one of {TASKS}")
        x = x.to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(1).sum())
            raise WeightSpaceError(f"{bad} rows have non-finite features (NaN or inf weights); "
                                   "leave them out in the query")
        self.features_kind, self.target, self.seed, self.layout = features, target, seed, layout
        self.features = x
        self.feature_names = names
        self.task, self.classes, self.targets = _encode_target(values, task)
        self.frame = pl.DataFrame({"run_id": run_ids, "step": steps,
                                   target: values.to_list()})
        self.fractions = dict(DEFAULT_SPLITS if splits is None else splits)
        self.split_of_run = split_runs(sorted(set(run_ids)), self.fractions, seed)
        split_names = np.array([self.split_of_run[r] for r in run_ids])
        self._rows = {name: np.flatnonzero(split_names == name) for name in self.fractions}
        self._layers = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[i], self.targets[i]

    def rows(self, split: str) -> np.ndarray:
        """Row indices of the runs in `split`, ascending."""
        if split not in self._rows:
            raise WeightSpaceError(f"no split {split!r}; splits are {list(self._rows)}")
        return self._rows[split]

    def split(self, name: str, augment: bool = False, generator: torch.Generator | None = None
              ) -> WeightSubset:
        """The rows of one split as a torch Dataset; `augment` draws every item under a random
        function-preserving permutation of hidden units (from `generator`)."""
        if augment and self.features_kind != "flat":
            raise WeightSpaceError(f"{self.features_kind} features are invariant to permutations "
                                   "of hidden units; augmentation applies to flat features")
        if augment and self._layers is None:
            self._layers = hidden_layers(self.layout, self._arch)
        return WeightSubset(self, self.rows(name), augment, generator)

    def split_frame(self) -> pl.DataFrame:
        """row, run_id, step, split of every row (what export writes as split files)."""
        return self.frame.select("run_id", "step").with_row_index("row").with_columns(
            pl.Series("split", [self.split_of_run[r] for r in self.frame["run_id"]]))

    def permuted(self, rows: np.ndarray | Sequence[int],
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Flat features of `rows`, each under a fresh random permutation of hidden units."""
        if self._layers is None:
            self._layers = hidden_layers(self.layout, self._arch)
        flat = self.features[torch.as_tensor(np.asarray(rows), dtype=torch.long)]
        return self.layout.flatten(random_permutation(self.layout.unflatten(flat), self._layers,
                                                      generator))


class WeightSubset(Dataset):
    """One split of a `WeightDataset` (optionally augmented by random permutations)."""

    def __init__(self, parent: WeightDataset, rows: np.ndarray, augment: bool,
                 generator: torch.Generator | None):
        self.parent, self.indices, self.augment, self.generator = parent, rows, augment, generator

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = int(self.indices[i])
        if self.augment:
            return self.parent.permuted([row], self.generator)[0], self.parent.targets[row]
        return self.parent[row]


def split_runs(run_ids: Sequence[str], fractions: Mapping[str, float], seed: int
               ) -> dict[str, str]:
    """{run_id: split}: the runs shuffled by `seed` and cut by the fractions' cumulative shares.
    Depends only on the set of run ids, the fractions and the seed."""
    if not fractions or any(not math.isfinite(f) or f < 0 for f in fractions.values()) or (
            sum(fractions.values()) <= 0):
        raise WeightSpaceError(f"split fractions must be non-negative with a positive sum; got "
                               f"{dict(fractions)}")
    wanted = [name for name, f in fractions.items() if f > 0]
    if len(run_ids) < len(wanted):
        raise WeightSpaceError(f"{len(run_ids)} runs cannot fill the {len(wanted)} splits "
                               f"{wanted}: a split holds whole runs")
    total = sum(fractions.values())
    bounds = np.round(np.cumsum([f / total for f in fractions.values()]) * len(run_ids))
    bounds = bounds.astype(int)
    # every split with a positive share holds at least one run
    sizes = np.diff(np.concatenate([[0], bounds]))
    for i, f in enumerate(fractions.values()):
        if f > 0 and sizes[i] == 0:
            donor = int(np.argmax(sizes))
            sizes[donor] -= 1
            sizes[i] += 1
    run_ids = sorted(run_ids)
    order = np.random.default_rng(seed).permutation(len(run_ids))
    labels = np.repeat(list(fractions), sizes)
    return {run_ids[k]: str(labels[pos]) for pos, k in enumerate(order)}


def target_values(store: Store, frame: pl.DataFrame, target: str) -> pl.Series:
    """The target of every row of `frame` (run_id, step, ...), in its order: a column of the
    frame, a runs column, `generalization_gap`, or a whole-model metric at the row's step."""
    if target == "run_id":
        raise WeightSpaceError("run_id cannot be a target: splits hold whole runs, so no test "
                               "run's id is ever seen in training")
    if target in frame.columns:
        values = frame[target]
    else:
        keys = frame.select("run_id", "step").with_row_index("_row")
        run_ids = keys["run_id"].unique().to_list()
        if target in RUNS.names:
            table = store.sql(f'SELECT run_id, "{target}" FROM runs '
                              "WHERE run_id IN (SELECT unnest(?::VARCHAR[]))", [run_ids])
            joined = keys.join(table, on="run_id", how="left")
        else:
            metrics = ["train_acc", "test_acc"] if target in GAP_TARGETS else [target]
            table = store.sql(
                "SELECT run_id, step, metric, value FROM metrics WHERE tensor IS NULL "
                "AND metric IN (SELECT unnest(?::VARCHAR[])) "
                "AND run_id IN (SELECT unnest(?::VARCHAR[]))", [metrics, run_ids])
            if table.height == 0:
                known = store.sql("SELECT DISTINCT metric FROM metrics WHERE tensor IS NULL "
                                  "ORDER BY 1")["metric"].to_list()
                raise NotFoundError(f"unknown target {target!r}: not a column of the query, a "
                                    f"runs column, {GAP_TARGETS[0]}, or a metric of these runs "
                                    f"({', '.join(known)})")
            wide = table.pivot("metric", index=["run_id", "step"], values="value")
            absent = [m for m in metrics if m not in wide.columns]
            if absent:
                raise NotFoundError(f"target {target!r} needs metrics {absent}, which these "
                                    "runs do not have")
            if target in GAP_TARGETS:
                wide = wide.with_columns((pl.col("train_acc") - pl.col("test_acc")).alias(target))
            joined = keys.join(wide.select("run_id", "step", target), on=["run_id", "step"],
                               how="left")
        values = joined.sort("_row")[target]
    missing = values.is_null()
    if values.dtype.is_float():
        missing = missing | values.is_nan()
    if missing.any():
        row = frame.filter(missing).row(0, named=True)
        raise QueryError(f"target {target!r} is missing for {int(missing.sum())} of "
                         f"{frame.height} rows, e.g. ({row['run_id']}, {row['step']}); leave "
                         "those out in the query")
    return values.alias(target)


def _encode_target(values: pl.Series, task: str) -> tuple[str, list | None, torch.Tensor]:
    categorical = values.dtype in (pl.String, pl.Boolean, pl.Categorical) or isinstance(
        values.dtype, pl.Enum)
    if task == "auto":
        task = "classification" if categorical else "regression"
    if task == "regression":
        if categorical:
            raise WeightSpaceError(f"target {values.name!r} holds {values.dtype} values; a "
                                   "regression needs numbers (use task='classification')")
        return task, None, torch.tensor(values.cast(pl.Float64).to_numpy(), dtype=torch.float32)
    classes = sorted(values.unique().to_list())
    code = {c: i for i, c in enumerate(classes)}
    return task, classes, torch.as_tensor([code[v] for v in values.to_list()], dtype=torch.long)


def _pull_stats(store: Store, keys: pl.DataFrame, batch_size: int
                ) -> tuple[torch.Tensor, list[str]]:
    """Statistics features of every row, pulled in batches per layout (stats need no common
    layout: runs of several widths get the same features at their true shapes). Features are
    of the tensors every run holds: a tensor only some runs have has no value for the others
    (weights as data hold floating-point tensors only: `Store.weights` leaves out integer
    buffers such as cnn2d's dropout counter, which would give away the training step)."""
    layouts, which = store.weight_layouts(keys)
    names_of = [[e.name for e in lay.entries] for lay in layouts]
    common = [n for n in names_of[0] if all(n in other for other in names_of[1:])]
    if not common:
        raise LayoutError(f"stats features need tensors that every run holds; the query mixes "
                          f"{names_of[0]} and {next(n for n in names_of if n != names_of[0])}")
    which = np.asarray(which)
    out: torch.Tensor | None = None
    names: list[str] = []
    for k, lay in enumerate(layouts):
        shapes = {e.name: e.shape for e in lay.entries}
        lay = Layout.from_shapes([(n, shapes[n]) for n in common], lay.dtype)
        rows = np.flatnonzero(which == k)
        done = 0
        for _, flat in store.iter_weights(keys[rows], batch_size=batch_size, layout=lay):
            x, names = stats_features(flat, lay)
            if out is None:
                out = torch.empty((keys.height, x.shape[1]), dtype=torch.float64)
            out[torch.as_tensor(rows[done:done + x.shape[0]])] = x
            done += x.shape[0]
    assert out is not None
    return out, names


# -- baselines -----------------------------------------------------------------------------


@dataclass
class PredictorResult:
    """A baseline fitted on the train (and val) runs, scored on the test runs."""

    model: str
    features: str
    target: str
    task: str
    seed: int
    kendall_tau: float | None
    r2: float | None
    accuracy: float | None
    n_train: int  # rows fitted on (train and val runs)
    n_test: int
    n_train_runs: int
    n_test_runs: int
    predictions: pl.DataFrame = field(repr=False)  # run_id, step, true, predicted (test rows)
    classes: list | None = None
    alpha: float | None = None  # ridge / logistic penalty chosen on the val runs (linear)

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in (
            "model", "features", "target", "task", "seed", "kendall_tau", "r2", "accuracy",
            "n_train", "n_test", "n_train_runs", "n_test_runs", "classes", "alpha")}
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in out.items()}


def fit_predictor(dataset: WeightDataset, model: str = "linear", seed: int = 0,
                  threads: int | None = 1) -> PredictorResult:
    """Fit a baseline predictor of the dataset's target from its features and score it on the
    test runs: "linear" (standardised ridge / logistic regression, penalty chosen on the val
    runs, then refitted on train + val), "gbm" (histogram gradient boosting) or "mlp" (two
    hidden layers of 128), scikit-learn throughout, all seeded.

    Regression reports Kendall's tau and R^2 of predicted vs true on the test rows;
    classification reports accuracy.

    `threads` caps BLAS and OpenMP threads during the fit (None = the libraries' defaults).
    One by default: these fits are small, and thread pools that spin while the cores are busy
    cost far more than they save (measured on 2 busy cores: gbm on 240 rows 30 s with the
    default pools, 0.6 s with one thread)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        return _fit_predictor(dataset, model, seed)


def _fit_predictor(dataset: WeightDataset, model: str, seed: int) -> PredictorResult:
    from scipy.stats import kendalltau
    from sklearn.metrics import accuracy_score, r2_score

    if model not in MODELS:
        raise WeightSpaceError(f"unknown model {model!r}; use one of {MODELS}")
    x = dataset.features.numpy().astype(np.float64)
    y = dataset.targets.numpy()
    train, val, test = (dataset.rows(s) if s in dataset.fractions else np.array([], int)
                        for s in ("train", "val", "test"))
    if len(test) == 0 or len(train) == 0:
        raise WeightSpaceError("fitting a predictor needs runs in a train and a test split")
    classify = dataset.task == "classification"
    if classify and len(np.unique(y[train])) < 2:
        raise WeightSpaceError(f"the train runs hold one class of {dataset.target!r}; a "
                               "classifier needs two or more")
    alpha = None
    if model == "linear":
        alpha = _choose_alpha(x, y, train, val, classify, seed)
    fitted_on = np.concatenate([train, val])
    estimator = _estimator(model, classify, seed, alpha)
    estimator.fit(x[fitted_on], y[fitted_on])
    predicted = estimator.predict(x[test])
    true = y[test]
    tau = r2 = accuracy = None
    if classify:
        accuracy = float(accuracy_score(true, predicted))
    else:
        tau = float(kendalltau(true, predicted).statistic)
        r2 = float(r2_score(true, predicted))
    predictions = dataset.frame[test].select("run_id", "step").with_columns(
        pl.Series("true", _decode(true, dataset.classes)),
        pl.Series("predicted", _decode(predicted, dataset.classes)))
    return PredictorResult(
        model=model, features=dataset.features_kind, target=dataset.target, task=dataset.task,
        seed=seed, kendall_tau=tau, r2=r2, accuracy=accuracy, n_train=len(fitted_on),
        n_test=len(test), n_train_runs=dataset.frame[fitted_on]["run_id"].n_unique(),
        n_test_runs=dataset.frame[test]["run_id"].n_unique(), predictions=predictions,
        classes=dataset.classes, alpha=alpha)


_ALPHAS = tuple(10.0 ** k for k in range(-3, 4))


def _choose_alpha(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray,
                  classify: bool, seed: int) -> float:
    """The penalty of the linear model that scores best on the val runs (1.0 without any)."""
    if len(val) == 0 or (classify and len(np.unique(y[train])) < 2):
        return 1.0
    scores = []
    for alpha in _ALPHAS:
        estimator = _estimator("linear", classify, seed, alpha).fit(x[train], y[train])
        scores.append(estimator.score(x[val], y[val]))
    return _ALPHAS[int(np.argmax(scores))]


def _estimator(model: str, classify: bool, seed: int, alpha: float | None):
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if model == "linear":
        head = (LogisticRegression(C=1.0 / alpha, max_iter=2000) if classify
                else Ridge(alpha=alpha))
        return make_pipeline(StandardScaler(), head)
    if model == "gbm":
        # early stopping off: its internal validation set would be drawn by checkpoint, not run
        kind = HistGradientBoostingClassifier if classify else HistGradientBoostingRegressor
        return kind(max_iter=300, learning_rate=0.05, early_stopping=False, random_state=seed)
    kind = MLPClassifier if classify else MLPRegressor
    net = make_pipeline(StandardScaler(), kind(hidden_layer_sizes=(128, 128), alpha=1e-3,
                                               max_iter=500, early_stopping=False,
                                               random_state=seed))
    return net if classify else TransformedTargetRegressor(net, transformer=StandardScaler())


def _decode(values: np.ndarray, classes: list | None) -> list:
    if classes is None:
        return [float(v) for v in values]
    return [classes[int(v)] for v in values]
