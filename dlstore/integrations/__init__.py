"""Training frameworks logging into a store through `Store.track`: a PyTorch Lightning callback
(`lightning.py`) and a Hugging Face `transformers` TrainerCallback (`hf.py`). Each imports its
framework only when used; install them with `pip install 'dlstore[lightning]'` / `'dlstore[hf]'`.
"""

from __future__ import annotations

import json
import math
from typing import Any


def json_config(values: dict[str, Any]) -> dict[str, Any]:
    """A framework's hyperparameters as a JSON-able config: numbers, strings, booleans, lists and
    tables kept, anything else (a class, a device, a tokenizer) by its text."""
    def clean(value):
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else str(value)
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return str(value)

    cleaned = clean(dict(values))
    json.dumps(cleaned)  # every leaf is JSON by now
    return cleaned


def scalars(values: dict[str, Any]) -> dict[str, float]:
    """The entries of a framework's logged values that are one number (tensors of one element
    included), by name; a name the views reserve (the trainers' `epoch`) as `trainer_<name>`."""
    from dlstore.store.tracking import RESERVED

    found = {}
    for name, value in values.items():
        if hasattr(value, "numel") and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            name = str(name)
            found[f"trainer_{name}" if name in RESERVED else name] = float(value)
    return found


class StepLog:
    """What a callback has logged per metric, so that a value a framework reports again at a
    step already logged (callback_metrics persist between batches) is not logged twice."""

    def __init__(self, run):
        self.run = run
        self._last: dict[str, int] = {}

    def log(self, step: int, values: dict[str, float]) -> None:
        new = {k: v for k, v in values.items() if self._last.get(k, -1) < step}
        if new:
            self.run.log(step, **new)
            self._last.update(dict.fromkeys(new, step))


class TrackingCallback:
    """What both callbacks share: the run they open when training starts, and its step log."""

    def __init__(self, store, zoo: str, config: dict[str, Any] | None = None,
                 run_id: str | None = None, resume: bool = False):
        self.store, self.zoo, self.extra = store, zoo, dict(config or {})
        self.run_id, self.resume = run_id, resume
        self.run = None
        self._steps: StepLog | None = None

    def start(self, config: dict[str, Any]) -> None:
        """Track the run: the framework's `config`, then the callback's own on top."""
        self.run = self.store.track(self.zoo, json_config({**config, **self.extra}),
                                    run_id=self.run_id, resume=self.resume)
        self._steps = StepLog(self.run)
