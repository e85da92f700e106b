"""The shard format: what a safetensors shard's `__metadata__` says, written and read here only.

A shard holds tensors with a leading member axis [P, ...] (`blobs.py` owns the bytes). Two kinds:

- a cohort shard (`dlstore-cohort/1`): one checkpoint step of members that share their shapes;
  `layout` (name, shape of one member, dtype; state-dict order), `arch` (the architecture's
  options as JSON), `input_shape`, `n_classes`, `run_ids` (one per member), `zoo`, `step`;
- a mask shard (`dlstore-masks/1`): lottery-ticket masks (0/1, one per member); `mask_ids`,
  `run_ids`, `zoo`.

With this metadata a shard is readable without the tables: which runs it holds, how to rebuild
their network, and the order of its tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

COHORT_FORMAT = "dlstore-cohort/1"
MASK_FORMAT = "dlstore-masks/1"


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def cohort_metadata(zoo: str, step: int, tensors: dict[str, torch.Tensor], arch_json: str,
                    input_shape: tuple[int, ...], n_classes: int, run_ids: list[str]
                    ) -> dict[str, str]:
    """The metadata of a cohort shard of `tensors` ([P, ...] each, in state-dict order)."""
    layout = [{"name": k, "shape": list(v.shape[1:]), "dtype": _dtype(v)}
              for k, v in tensors.items()]
    return {"format": COHORT_FORMAT, "zoo": zoo, "step": str(step), "layout": json.dumps(layout),
            "arch": arch_json, "input_shape": json.dumps(list(input_shape)),
            "n_classes": str(n_classes), "run_ids": json.dumps(run_ids)}


def mask_metadata(zoo: str, mask_ids: list[str], run_ids: list[str]) -> dict[str, str]:
    """The metadata of a mask shard: member i is mask `mask_ids[i]`, found by `run_ids[i]`."""
    return {"format": MASK_FORMAT, "zoo": zoo, "mask_ids": json.dumps(mask_ids),
            "run_ids": json.dumps(run_ids)}


@dataclass(frozen=True)
class ShardInfo:
    """A shard's metadata, parsed; fields a kind does not record are None."""

    format: str | None
    zoo: str | None
    run_ids: list[str] | None
    order: list[str] | None  # tensor names in state-dict order (cohort shards)
    step: int | None = None
    mask_ids: list[str] | None = None


def read(metadata: dict[str, str]) -> ShardInfo:
    """Parse a shard's metadata; what is missing or unreadable is None (a shard written by
    another tool is still readable as tensors, in header order)."""
    def parsed(key: str):
        try:
            return json.loads(metadata[key])
        except (KeyError, ValueError, TypeError):
            return None

    layout = parsed("layout")
    try:
        order = [t["name"] for t in layout] if isinstance(layout, list) else None
    except (TypeError, KeyError):
        order = None
    step = metadata.get("step")
    return ShardInfo(metadata.get("format"), metadata.get("zoo"), parsed("run_ids"), order,
                     int(step) if step is not None and step.isdigit() else None,
                     parsed("mask_ids"))
