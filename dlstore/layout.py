"""Weight layouts: how a state dict maps to one flat vector, and back.

A `Layout` is an ordered list of tensors (name, shape) with their offsets in the flat vector, in
state-dict order (layer by layer, weight before bias), the order the shards record. It is what
`Store.weights` returns beside the matrix, what exporters write as layout.csv, and what turns a
row of weights back into a state dict:

    W, layout = store.weights("SELECT run_id, step FROM checkpoints WHERE ...")
    state = layout.unflatten(W[0])           # {name: tensor}, loadable with load_state_dict
    layout.flatten(state)                    # == W[0]
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from dlstore.errors import LayoutError


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    start: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def slice(self) -> slice:
        return slice(self.start, self.end)


@dataclass(frozen=True)
class Layout:
    entries: tuple[Entry, ...]
    dtype: str = "float32"

    @classmethod
    def from_shapes(cls, shapes: Iterable[tuple[str, Iterable[int]]],
                    dtype: str = "float32") -> Layout:
        entries, start = [], 0
        for name, shape in shapes:
            entry = Entry(str(name), tuple(int(n) for n in shape), start)
            entries.append(entry)
            start = entry.end
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise LayoutError(f"a layout names a tensor twice: {names}")
        return cls(tuple(entries), dtype)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> Layout:
        dtypes = {str(v.dtype).removeprefix("torch.") for v in state.values()}
        dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
        return cls.from_shapes(((k, v.shape) for k, v in state.items()), dtype)

    @classmethod
    def union(cls, layouts: Iterable[Layout]) -> Layout:
        """The smallest layout every given one fits in the corner of (per tensor, the largest
        size along each axis): pulls runs of several widths into one zero-padded matrix, the way
        the cohort trainer pads narrower members."""
        layouts = list(layouts)
        if not layouts:
            raise LayoutError("no layouts to unite")
        first = layouts[0]
        for other in layouts[1:]:
            if other.names != first.names or [len(e.shape) for e in other.entries] != [
                    len(e.shape) for e in first.entries]:
                raise LayoutError(f"layouts of different tensors cannot be padded into one: "
                                  f"{first.describe()} vs {other.describe()}")
        shapes = [(e.name, tuple(max(lay.entries[i].shape[a] for lay in layouts)
                                 for a in range(len(e.shape))))
                  for i, e in enumerate(first.entries)]
        return cls.from_shapes(shapes, first.dtype)

    @property
    def size(self) -> int:
        return self.entries[-1].end if self.entries else 0

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise LayoutError(f"layout dtype {self.dtype!r} is not a torch dtype")
        return dtype

    def __getitem__(self, name: str) -> Entry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise LayoutError(f"the layout holds no tensor {name!r}; it holds {self.names}")

    def __contains__(self, name: object) -> bool:
        return any(e.name == name for e in self.entries)

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A state dict (tensors at the layout's shapes, with any leading batch axes) -> [..., d].
        """
        missing = [n for n in self.names if n not in state]
        if missing:
            raise LayoutError(f"the state dict lacks tensors {missing} of the layout")
        parts = []
        for e in self.entries:
            t = state[e.name]
            if tuple(t.shape[t.dim() - len(e.shape):]) != e.shape:
                raise LayoutError(f"tensor {e.name} has shape {tuple(t.shape)}; "
                                  f"the layout says {e.shape}")
            parts.append(t.reshape(*t.shape[:t.dim() - len(e.shape)], e.size))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """[..., d] -> {name: [..., *shape]} (views of `flat`)."""
        if flat.shape[-1] != self.size:
            raise LayoutError(f"a vector of {flat.shape[-1]} weights does not fit a layout of "
                              f"{self.size}")
        lead = flat.shape[:-1]
        return {e.name: flat[..., e.slice].reshape(*lead, *e.shape) for e in self.entries}

    def rows(self) -> list[dict]:
        """One row per tensor: varname, start_idx, end_idx (exclusive), shape (layout.csv)."""
        return [{"varname": e.name, "start_idx": e.start, "end_idx": e.end,
                 "shape": str(e.shape)} for e in self.entries]

    def to_json(self) -> str:
        return json.dumps({"dtype": self.dtype,
                           "tensors": [[e.name, list(e.shape)] for e in self.entries]})

    @classmethod
    def from_json(cls, text: str) -> Layout:
        data = json.loads(text)
        return cls.from_shapes(((n, s) for n, s in data["tensors"]), data["dtype"])

    def describe(self) -> str:
        """Short text for messages: name[shape] of every tensor."""
        return ", ".join(f"{e.name}{list(e.shape)}" for e in self.entries)
