"""`dlstore import raytune DIR`: Ray Tune trial directories, as the Model Zoos (Schürholt et al.
2022) and the Phase-Transition Model Zoo ship them.

DIR holds one directory per trained model (or is one), each with

- `params.json`: the trial's config, flat keys such as `model::type`, `model::nlin`,
  `model::channels_in`, `model::dropout`, `optim::lr`, `optim::wd`, `optim::optimizer`,
  `training::batchsize`, `seed`;
- `result.json`: JSON lines, one per epoch (metrics such as `train_loss`, `train_acc`,
  `test_loss`, `test_acc`, `val_*`, with Ray's bookkeeping: `training_iteration`, `trial_id`,
  `time_*`, ...). The step is `training_iteration` (the Model Zoos' trainable starts at
  iteration -1, so 0 is the initialisation's evaluation), or `epoch` when the trainable logs
  one;
- `checkpoint_<NNNNNN>/checkpoints`: a torch state dict at epoch NNNNNN (epoch 0 is the
  initialisation), read with `torch.load(weights_only=True)`; a `module.` (DataParallel) or
  `model.` prefix on its keys is dropped. The folder's `optimizer` state is not imported.

A run per trial directory, its id from the directory's name; steps are epochs. The params map
onto the typed runs columns (`optim::lr` -> lr, `optim::wd` -> weight_decay,
`training::batchsize` -> batch_size, `optim::optimizer` -> optimizer, `seed`, `model::width`
-> width); the whole params.json is the config. `model::type` CNN, CNN2 or CNN3 rebuilds as
the registered `modelzoo_cnn` architecture.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from dlstore.architectures.modelzoo import VARIANTS, input_size
from dlstore.importers.base import (
    ImportSourceError,
    SourceCheckpoint,
    SourceRun,
    as_float,
    json_lines,
    read_state_dict,
    source_dirs,
)

# Ray's own fields in result.json, not metrics
RAY_FIELDS = frozenset({
    "done", "training_iteration", "trial_id", "experiment_id", "date", "timestamp", "pid",
    "hostname", "node_ip", "config", "time_this_iter_s", "time_total_s", "time_since_restore",
    "timesteps_since_restore", "iterations_since_restore", "timesteps_total", "episodes_total",
    "episode_reward_mean", "experiment_tag", "warmup_time", "should_checkpoint",
    "checkpoint_dir_name", "epoch", "step"})
TYPED = {"optim::lr": "lr", "optim::wd": "weight_decay", "optim::optimizer": "optimizer",
         "training::batchsize": "batch_size", "seed": "seed", "model::width": "width",
         "training::epochs_train": "epochs", "model::depth": "depth"}
_CHECKPOINT = re.compile(r"checkpoint_(\d+)$")


def trial_dirs(root: Path) -> list[Path]:
    return source_dirs(root, lambda p: (p / "params.json").is_file(), "raytune",
                       "trial directory (one with params.json, result.json and "
                       "checkpoint_NNNNNN/)")


def read_source(root: Path, options: dict) -> tuple[int, Iterator[SourceRun]]:
    trials = trial_dirs(root)
    return len(trials), (read_trial(t) for t in trials)


def read_trial(trial: Path) -> SourceRun:
    run = SourceRun(key=trial.name, config={})
    try:
        params = json.loads((trial / "params.json").read_text())
        if not isinstance(params, dict):
            raise ValueError
    except (OSError, ValueError):
        run.error = f"import raytune: {trial / 'params.json'} is not a JSON object"
        return run
    try:
        run.metrics = list(_results(trial / "result.json"))
        run.checkpoints = _checkpoints(trial)
    except ImportSourceError as e:
        run.error = str(e)
        return run
    if not run.checkpoints:
        run.error = (f"import raytune: {trial} has no checkpoint_NNNNNN/checkpoints; a trial "
                     "without weights is not imported")
        return run
    run.config = trial_config(params, trial.name)
    return run


def trial_config(params: dict, name: str) -> dict:
    config: dict = {"params": params, "source": name}
    for key, column in TYPED.items():
        if key in params and params[key] is not None:
            config[column] = params[key]
    if isinstance(config.get("optimizer"), str):
        config["optimizer"] = config["optimizer"].lower()
    variant = params.get("model::type")
    if variant in VARIANTS:
        channels = int(params.get("model::channels_in", 1))
        side = input_size(variant)
        config["model"] = {"arch": "modelzoo_cnn", "variant": variant,
                           "nlin": params.get("model::nlin", "leakyrelu"),
                           "dropout": float(params.get("model::dropout", 0.0) or 0.0)}
        config["input_shape"] = [channels, side, side]
        config["n_classes"] = int(params.get("model::o_dim", 10))
    if isinstance(params.get("dataset::dump"), str):
        config["dataset"] = Path(params["dataset::dump"]).stem
    return config


def _results(path: Path) -> Iterator[tuple[int, dict[str, float]]]:
    if not path.is_file():
        return
    for line, row in json_lines(path, "import raytune"):
        step = row.get("epoch", row.get("training_iteration"))
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step < 0:
            raise ImportSourceError(f"import raytune: {path} line {line}: no epoch or "
                                    "training_iteration")
        values = {k: as_float(v) for k, v in row.items() if k not in RAY_FIELDS}
        yield int(step), {k: v for k, v in values.items() if v is not None}


def _checkpoints(trial: Path) -> list[SourceCheckpoint]:
    found = []
    for folder in sorted(trial.iterdir()):
        match = _CHECKPOINT.match(folder.name)
        if match and folder.is_dir():
            path = folder / "checkpoints"
            if not path.is_file():
                raise ImportSourceError(f"import raytune: {path} is missing")
            step = int(match.group(1))
            found.append(SourceCheckpoint(step, float(step), lambda p=path: read_checkpoint(p)))
    return found


def read_checkpoint(path: Path) -> dict:
    """A trial's state dict; a prefix every key has (`module.`: DataParallel, `model.`)
    dropped."""
    state = read_state_dict(path, "import raytune")
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state
