"""ZooSpec: a TOML file that names a population of runs, validated field by field.

    name = "quickstart"
    seeds = 2                      # or an explicit list [0, 1]
    checkpoints = "log:10"         # "log:K", "every:N", or a list of steps
    [dataset]  name = "mnist1d", n_train = 4000, label_noise = 0.0, ...
    [model]    arch = "mlp", width = 64, depth = 2, activation = "relu"
    [train]    optimizer = "sgd", lr = 0.1, momentum = 0.9, batch_size = 128, epochs = 20, ...
    [grid]     model.width = [16, 32, 64]     # any field above as a list of values
               train.lr = [0.01, 0.1]
    [build]    cohort_size = "auto"            # how the zoo is built, not what it contains
    [metrics]  hessian = { subsample = 512, at = "last" }   # what is measured, not what is trained
    [phases]   train_loss = 0.1                # thresholds of the phase taxonomy (analysis)
    [tickets]  levels = 8, prune_fraction = 0.2, rewind_steps = [0, 100]   # lottery tickets
    [transfer] levels = [4, 8]; [transfer.targets.adam] train.optimizer = "adam"

The runs are the Cartesian product of the grid times the seeds. Each run has a stable id: a hash
of its canonical config with defaults left out, plus the zoo name, so adding an option with a
no-op default later does not rename existing runs. `[metrics]`, `[phases]` and `[build]` are
zoo-level: they never enter a run id (see `MetricsOptions`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dlstore.errors import SpecError, format_validation_error
from dlstore.ids import hashed_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib
from dlstore.architectures.base import Architecture
from dlstore.architectures.registry import parse_arch_options
from dlstore.datasets.base import Dataset
from dlstore.datasets.registry import parse_dataset_options
from dlstore.metrics.families import (
    MetricsOptions,
)

SECTIONS = ("dataset", "model", "train")
DEFAULT_CHECKPOINTS = "log:10"
# Most runs one spec may describe, checked before the grid is expanded, so that a typo such as
# `seeds = 10000000000` is an error instead of an expansion that exhausts memory.
MAX_RUNS = 1_000_000
MAX_TABLE_KEYS = 1_000


class TrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        default="sgd", description="adam adds weight decay to the gradient (L2, as "
        "torch.optim.Adam); adamw decays the weights directly (decoupled, torch.optim.AdamW)")
    lr: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1, description="sgd only")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="adam(w) only")
    eps: float = Field(default=1e-8, gt=0, description="adam(w) only")
    weight_decay: float = Field(default=0.0, ge=0, description="L2 penalty added to the gradient "
                                "(sgd, adam) or decoupled decay of the weights (adamw)")
    batch_size: int = Field(default=128, ge=1)
    epochs: int | None = Field(default=None, ge=1)
    steps: int | None = Field(default=None, ge=1)
    schedule: Literal["constant", "cosine"] = "constant"
    order_seed: int | None = Field(default=None, description="data order; None = from the seed")

    @model_validator(mode="after")
    def _one_length(self) -> TrainOptions:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs or steps")
        if self.optimizer != "sgd" and "momentum" in self.model_fields_set:
            raise ValueError(f"momentum is an sgd option; {self.optimizer} uses betas")
        if self.optimizer == "sgd" and self.model_fields_set & {"betas", "eps"}:
            raise ValueError("betas and eps are adam options")
        return self

    def total_steps(self, n_train: int) -> int:
        return self.steps if self.steps is not None else self.epochs * self.steps_per_epoch(n_train)

    def steps_per_epoch(self, n_train: int) -> int:
        """Batches per epoch; the last partial batch is dropped so that every step of every member
        has the same batch shape (what lets a cohort train as one computation)."""
        return n_train // self.batch_size


class BuildOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cohort_size: Literal["auto"] | int = Field(
        default="auto", description="most members trained together; auto = from the device's "
        "cache (CPU) or free memory (GPU) and the network's size")

    commit_every: float = Field(
        default=10.0, ge=0, description="seconds between commits of finished cohorts; a crash "
        "loses (and a rebuild retrains) at most this much finished work")

    @field_validator("cohort_size")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("give a positive number of members or 'auto'")
        return value


class PhaseOptions(BaseModel):
    """Thresholds of the phase taxonomy of Yang et al. 2021 (`dlstore.analysis.phases`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    train_loss: float = Field(default=0.1, gt=0, description="mean final train loss above which "
                              "a config is poorly trained (Phases I, II)")
    mode_connectivity: float = Field(default=0.01, ge=0, description="|mc| (train error) up to "
                                     "which seeds count as connected")
    cka: float = Field(default=0.9, ge=0, le=1, description="CKA from which a connected, "
                       "well-trained config is Phase IV-B")
    hessian_top_eig: float | None = Field(default=None, gt=0, description="if given, a top "
                                          "Hessian eigenvalue above it also counts as poorly "
                                          "trained")


ControlKind = Literal["reinit", "random_mask"]


class TicketOptions(BaseModel):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2020):
    each level removes `prune_fraction` of the remaining prunable weights (every tensor of two or
    more dimensions: weights, not biases) by magnitude of the previous level's trained weights,
    rewinds the rest to the dense run's weights at a rewind step and trains them again."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    levels: int = Field(ge=1, le=64, description="pruning rounds; level k keeps about (1-p)^k")
    prune_fraction: float = Field(default=0.2, gt=0, lt=1,
                                  description="share of the remaining weights removed per level")
    output_prune_fraction: float | None = Field(
        default=None, ge=0, lt=1, description="for the output layer; None = half prune_fraction")
    scope: Literal["global", "layerwise"] = Field(
        default="global", description="rank magnitudes across the hidden layers together, or "
        "within each tensor (the output layer is always pruned on its own)")
    rewind_steps: list[int] = Field(default=[0], min_length=1,
                                    description="0 = initialisation; k = late rewinding")
    controls: list[ControlKind] = Field(default=["reinit", "random_mask"])
    stability: bool = Field(default=False, description="train a copy of every ticket with "
                            "another data order and record their interpolation barrier")

    @field_validator("rewind_steps", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("rewind_steps")
    @classmethod
    def _distinct_steps(cls, value: list[int]) -> list[int]:
        if any(s < 0 for s in value) or len(set(value)) != len(value):
            raise ValueError("give distinct non-negative steps")
        return sorted(value)

    @field_validator("controls")
    @classmethod
    def _distinct_controls(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("repeated control")
        return value

    @property
    def output_fraction(self) -> float:
        return (self.prune_fraction / 2 if self.output_prune_fraction is None
                else self.output_prune_fraction)

    def pruning_key(self) -> dict[str, Any]:
        """What decides a mask, defaults left out: part of every ticket's run id."""
        return self.model_dump(include={"prune_fraction", "output_prune_fraction", "scope"},
                               exclude_defaults=True)


class TransferOptions(BaseModel):
    """Tickets found on the spec's own runs, trained under other conditions (Morcos et al.
    2019): each target names overrides of the source runs' dataset / train fields, or a
    `seed_offset`. The architecture is the ticket's, so model fields cannot change."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    targets: dict[str, dict[str, Any]] = Field(min_length=1)
    levels: list[int] | None = Field(default=None, description="source levels; None = all")
    rewind_steps: list[int] | None = Field(default=None, description="None = all")
    seeds: list[int] | None = Field(default=None, description="source seeds; None = all")
    controls: list[ControlKind] = Field(
        default=["reinit", "random_mask"], description="reinit = the mask on a fresh init")
    find_on_target: bool = Field(default=True, description="also find tickets under each "
                                 "target condition, to compare transferred tickets with")
    all_pairs: bool = Field(default=False, description="transfer between every two conditions "
                            "that have tickets, not only from the spec's own runs")

    @field_validator("targets")
    @classmethod
    def _names(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, overrides in value.items():
            if name == "base" or not _NAME.fullmatch(name):
                raise ValueError(f"target name {name!r}: use letters, digits, _ . - (not 'base')")
            if not isinstance(overrides, dict) or not overrides:
                raise ValueError(f"target {name!r}: give a table of overrides")
        return value


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class _SpecFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    seeds: int | list[int] = 1
    checkpoints: str | list[int] = DEFAULT_CHECKPOINTS
    dataset: dict[str, Any]
    model: dict[str, Any]
    train: dict[str, Any]
    grid: dict[str, Any] = {}
    build: BuildOptions = BuildOptions()
    metrics: dict[str, Any] = {}
    phases: PhaseOptions = PhaseOptions()
    tickets: TicketOptions | None = None
    transfer: TransferOptions | None = None


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one trained model."""

    zoo: str
    dataset: Dataset
    model: Architecture
    train: TrainOptions
    checkpoints: str | tuple[int, ...]
    seed: int
    # steps saved beyond `checkpoints` (a tickets zoo's rewind steps)
    extra_checkpoints: tuple[int, ...] = ()

    @property
    def start_step(self) -> int:
        """The step training starts at (ticket runs start at their rewind step)."""
        return 0

    def canonical(self) -> dict[str, Any]:
        """The config with defaults left out: what the run id hashes."""
        out: dict[str, Any] = {
            "dataset": self.dataset.model_dump(exclude_defaults=True),
            "model": self.model.model_dump(exclude_defaults=True),
            "train": self.train.model_dump(exclude_defaults=True),
            "seed": self.seed,
        }
        if self.checkpoints != DEFAULT_CHECKPOINTS:
            out["checkpoints"] = self.checkpoints
        if self.extra_checkpoints:
            out["extra_checkpoints"] = list(self.extra_checkpoints)
        return out

    def full(self) -> dict[str, Any]:
        """The config with every default spelled out: what the runs table stores as JSON."""
        return {
            "dataset": self.dataset.model_dump(mode="json"),
            "model": self.model.model_dump(mode="json"),
            "train": self.train.model_dump(mode="json"),
            "checkpoints": list(self.checkpoints)
            if isinstance(self.checkpoints, tuple) else self.checkpoints,
            "seed": self.seed,
            **({"extra_checkpoints": list(self.extra_checkpoints)}
               if self.extra_checkpoints else {}),
        }

    @functools.cached_property
    def run_id(self) -> str:
        return hashed_id(self.zoo, self.canonical())

    def checkpoint_steps(self, total_steps: int) -> list[int]:
        steps = checkpoint_steps(self.checkpoints, total_steps)
        late = [s for s in self.extra_checkpoints if s > total_steps]
        if late:
            raise SpecError(f"tickets.rewind_steps: step {late[0]} is past the last step "
                            f"({total_steps}) of run {self.run_id}")
        return sorted(set(steps) | set(self.extra_checkpoints))




@dataclass(frozen=True)
class ZooSpec:
    name: str
    text: str
    runs: tuple[RunConfig, ...]
    build: BuildOptions
    metrics: MetricsOptions = MetricsOptions()
    phases: PhaseOptions = PhaseOptions()
    tickets: TicketOptions | None = None
    transfer: TransferOptions | None = None
    # transfer target name -> the spec's runs (same order) under that target's overrides
    conditions: tuple[tuple[str, tuple[RunConfig, ...]], ...] = ()

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @functools.cached_property
    def identity(self) -> str:
        """What makes two specs one zoo: the same runs (and ticket lineages). Comments,
        `[build]`, `[metrics]`, `[phases]` and the order of grid values do not count."""
        payload = {"runs": sorted(r.run_id for r in self.runs),
                   "tickets": self.tickets.model_dump(mode="json") if self.tickets else None,
                   "transfer": self.transfer.model_dump(mode="json") if self.transfer else None}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_toml(cls, path: str | Path) -> ZooSpec:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SpecError(f"spec file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"cannot read spec file {path}: {e}") from None
        return cls.from_text(text, source=str(path))

    @classmethod
    def from_text(cls, text: str, source: str = "<spec>") -> ZooSpec:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SpecError(f"{source} is not valid TOML: {e}") from None
        except RecursionError:  # tomllib parses nested arrays and tables recursively
            raise SpecError(f"{source}: arrays or tables nested deeper than the TOML parser can "
                            "follow (hundreds of levels)") from None
        return cls.from_dict(raw, text=text)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], text: str | None = None) -> ZooSpec:
        try:
            return cls._from_dict(raw, text)
        except RecursionError:
            raise SpecError("spec: values nested hundreds of levels deep") from None

    @classmethod
    def _from_dict(cls, raw: dict[str, Any], text: str | None) -> ZooSpec:
        _check_table_sizes(raw)
        try:
            top = _SpecFile.model_validate(raw)
        except ValidationError as e:
            raise SpecError(format_validation_error(e)) from None
        n_seeds = top.seeds if isinstance(top.seeds, int) else len(top.seeds)
        if n_seeds < 1:
            raise SpecError("seeds: give a positive count or a non-empty list of seeds")
        if n_seeds > MAX_RUNS:
            raise SpecError(f"seeds: {n_seeds} seeds is more than the {MAX_RUNS:,} runs a spec "
                            "may hold")
        seeds = list(range(top.seeds)) if isinstance(top.seeds, int) else top.seeds
        if len(set(seeds)) != len(seeds):
            raise SpecError("seeds: repeated seed")
        parse_checkpoints(top.checkpoints)
        base = {"dataset": top.dataset, "model": top.model, "train": top.train,
                "checkpoints": top.checkpoints}
        if not top.grid:
            _parse_sections(base)
        axes = _grid_axes(top.grid, base)
        n_runs = math.prod(len(values) for _, values in axes) * n_seeds
        if n_runs > MAX_RUNS:
            raise SpecError(f"grid x seeds gives {n_runs:,} runs, more than the {MAX_RUNS:,} a "
                            "spec may hold; split the zoo into several specs")
        extra = tuple(top.tickets.rewind_steps) if top.tickets else ()
        runs = []
        for values in itertools.product(*(vals for _, vals in axes)):
            sections = copy.deepcopy(base)
            for (path, _), value in zip(axes, values):
                _set_path(sections, path, value)
            dataset, model, train = _parse_sections(sections)
            ckpt = sections["checkpoints"]
            for seed in seeds:
                runs.append(RunConfig(top.name, dataset, model, train,
                                      ckpt if isinstance(ckpt, str) else tuple(ckpt), seed,
                                      extra))
        ids = [r.run_id for r in runs]
        if len(set(ids)) != len(ids):
            raise SpecError("grid: two grid points describe the same run (repeated value?)")
        conditions = _transfer_conditions(top, runs, seeds)
        metrics = MetricsOptions(top.metrics)
        _check_declared(top, metrics, runs)
        return cls(top.name, text if text is not None else json.dumps(raw), tuple(runs), top.build,
                   metrics, top.phases, top.tickets, top.transfer, conditions)


def _check_declared(top: _SpecFile, metrics: MetricsOptions, runs: list[RunConfig]) -> None:
    """Refuse, before anything trains, a feature whose architecture lacks a property it needs."""
    needs = []
    if top.tickets is not None:
        needs.append(("prunable_tensors", "tickets"))
    for name, family in metrics.families:
        needs += [(prop, f"metrics.{name}") for prop in family.needs]
    if metrics.groups is not None:
        needs.append(("features_method", "metrics.groups (CKA)"))
    seen = set()
    for run in runs:
        if type(run.model) in seen:
            continue
        seen.add(type(run.model))
        for prop, feature in needs:
            run.model.require(prop, feature)


def _check_table_sizes(raw: dict[str, Any]) -> None:
    """A table with thousands of keys is no spec (every one would be an unknown field, each
    checked once per grid value): refuse it before validating anything."""
    tables = [("", raw)]
    while tables:
        name, table = tables.pop()
        if len(table) > MAX_TABLE_KEYS:
            raise SpecError(f"{name or 'spec'}: {len(table):,} keys in one table, more than the "
                            f"{MAX_TABLE_KEYS:,} a spec table may have")
        tables += [(f"{name}.{k}" if name else str(k), v) for k, v in table.items()
                   if isinstance(v, dict)]


def _transfer_conditions(top: _SpecFile, runs: list[RunConfig], seeds: list[int]
                         ) -> tuple[tuple[str, tuple[RunConfig, ...]], ...]:
    """Check [transfer] against [tickets] and the seeds; each target's runs, aligned with `runs`."""
    transfer, tickets = top.transfer, top.tickets
    if transfer is None:
        return ()
    if tickets is None:
        raise SpecError("transfer: needs a [tickets] section (it moves the tickets found there)")
    bad_level = [k for k in transfer.levels or [] if not 1 <= k <= tickets.levels]
    if bad_level:
        raise SpecError(f"transfer.levels: level {bad_level[0]} is not one of the tickets' levels "
                        f"1..{tickets.levels}")
    bad_step = [s for s in transfer.rewind_steps or [] if s not in tickets.rewind_steps]
    if bad_step:
        raise SpecError(f"transfer.rewind_steps: {bad_step[0]} is not one of tickets.rewind_steps "
                        f"{tickets.rewind_steps}")
    bad_seed = [s for s in transfer.seeds or [] if s not in seeds]
    if bad_seed:
        raise SpecError(f"transfer.seeds: seed {bad_seed[0]} is not one of the zoo's seeds")
    seen = {r.run_id for r in runs}
    out = []
    for name, table in transfer.targets.items():
        where = f"transfer.targets.{name}"
        target = tuple(_under_condition(run, _flatten(table), where) for run in runs)
        ids = {r.run_id for r in target}
        if ids & seen:
            raise SpecError(f"{where}: gives runs the zoo already holds (another seed_offset or "
                            "override is needed for a different condition)")
        seen |= ids
        out.append((name, target))
    return tuple(out)


def _under_condition(run: RunConfig, overrides: list[tuple[tuple, Any]], where: str) -> RunConfig:
    """`run` with a transfer target's overrides: dataset.FIELD, train.FIELD or seed_offset."""
    sections = {"dataset": run.dataset.model_dump(exclude_unset=True),
                "train": run.train.model_dump(exclude_unset=True)}
    seed = run.seed
    for path, value in overrides:
        name = f"{where}.{'.'.join(path)}"
        if path == ("seed_offset",):
            if not isinstance(value, int) or isinstance(value, bool) or value == 0:
                raise SpecError(f"{name}: give a non-zero integer added to each source seed")
            seed = run.seed + value
        elif len(path) == 2 and path[0] in ("dataset", "train"):
            sections[path[0]][path[1]] = value
        else:
            raise SpecError(f"{name}: not a transfer condition; give dataset.FIELD, train.FIELD "
                            "or seed_offset (a ticket keeps its architecture)")
    train = sections["train"]
    switched = dict(overrides).get(("train", "optimizer"))
    if switched is not None and switched != run.train.optimizer:
        # the other optimizer's options came from the source; the target's are its defaults
        given = {p[1] for p, _ in overrides if p[0] == "train"}
        for key in ({"momentum"} if switched == "adam" else {"betas", "eps"}) - given:
            train.pop(key, None)
    try:
        dataset = parse_dataset_options(sections["dataset"])
        train_options = TrainOptions.model_validate(train)
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from None
    except ValidationError as e:
        raise SpecError(format_validation_error(e, f"{where}.train")) from None
    return RunConfig(run.zoo, dataset, run.model, train_options, run.checkpoints, seed,
                     run.extra_checkpoints)


def _parse_sections(sections: dict[str, Any]) -> tuple[Dataset, Architecture, TrainOptions]:
    dataset = parse_dataset_options(sections["dataset"])
    model = parse_arch_options(sections["model"])
    try:
        train = TrainOptions.model_validate(sections["train"])
    except ValidationError as e:
        raise SpecError(format_validation_error(e, "train")) from None
    return dataset, model, train


def _flatten(grid: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple, Any]]:
    """`[grid] model.width = [..]` arrives nested, `"model.width" = [..]` as one key: take both."""
    out = []
    for key, value in grid.items():
        path = prefix + tuple(key.split("."))
        if isinstance(value, dict):
            out.extend(_flatten(value, path))
        else:
            out.append((path, value))
    return out


def _grid_axes(grid: dict[str, Any], base: dict[str, Any]) -> list[tuple[tuple[str, ...], list]]:
    axes = []
    for path, values in _flatten(grid):
        name = "grid." + ".".join(path)
        if path[0] not in (*SECTIONS, "checkpoints") or (path[0] in SECTIONS) != (len(path) == 2):
            raise SpecError(f"{name}: not a spec field; sweep fields such as model.width, "
                            "train.lr, dataset.label_noise or checkpoints")
        if not isinstance(values, list) or not values:
            raise SpecError(f"{name}: expected a non-empty list of values")
        for value in values:  # each value checked alone, so the error names the grid entry
            sections = copy.deepcopy(base)
            _set_path(sections, path, value)
            try:
                if path[0] == "checkpoints":
                    parse_checkpoints(value)
                else:
                    _parse_sections(sections)
            except SpecError as e:
                raise SpecError(f"{name} = {value!r}: {e}") from None
        axes.append((path, values))
    return axes


def _set_path(sections: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    if len(path) == 1:
        sections[path[0]] = value
    else:
        sections[path[0]][path[1]] = value


def parse_checkpoints(value: str | list[int]) -> tuple[str, int] | list[int]:
    """`"log:K"` / `"every:N"` -> (kind, number); an explicit list of steps -> the sorted list."""
    if isinstance(value, list):
        if not value or any(not isinstance(s, int) or s < 0 for s in value):
            raise SpecError("checkpoints: an explicit list must hold non-negative step numbers")
        return sorted(set(value))
    kind, _, number = value.partition(":")
    if kind not in ("log", "every") or not number.isdigit() or int(number) < 1:
        raise SpecError(f"checkpoints: {value!r} is not 'log:K', 'every:N' or a list of steps")
    if kind == "log" and int(number) < 2:
        raise SpecError("checkpoints: 'log:K' needs K >= 2 (step 0 and the last step)")
    return kind, int(number)


def checkpoint_steps(value: str | tuple[int, ...] | list[int], total_steps: int) -> list[int]:
    """The concrete steps to save for a run of `total_steps` optimizer steps."""
    parsed = parse_checkpoints(list(value) if isinstance(value, tuple) else value)
    if isinstance(parsed, list):
        late = [s for s in parsed if s > total_steps]
        if late:
            raise SpecError(f"checkpoints: step {late[0]} is past the last step ({total_steps})")
        return parsed
    kind, k = parsed
    if kind == "every":
        return sorted(set(range(0, total_steps + 1, k)) | {total_steps})
    # log:K -> step 0 plus K-1 distinct log-spaced steps from 1 to the last step
    want = min(k - 1, total_steps)
    n = want
    while True:
        steps = sorted({round(math.exp(math.log(total_steps) * i / max(n - 1, 1)))
                        for i in range(n)} | {total_steps})
        if len(steps) >= want or n > total_steps:
            break
        n += 1
    if len(steps) > want:  # keep the first and the last, thin the middle evenly
        idx = [round(i * (len(steps) - 1) / (want - 1)) for i in range(want)] if want > 1 else [-1]
        steps = [steps[i] for i in idx]
    return [0, *steps]




