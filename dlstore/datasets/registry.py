"""The dataset registry: built-ins by name (`@register_dataset`), plugins by import path or entry
point (`dlstore.plugins`); a spec's [dataset] table is validated against its class.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError

from dlstore.datasets.base import Dataset, DatasetOptions
from dlstore.errors import SpecError, format_validation_error

DATASETS: dict[str, type[Dataset]] = {}


def register_dataset(name: str) -> Callable[[type[DatasetOptions]], type[DatasetOptions]]:
    """Class decorator: make `name` (the class's `name` literal) valid in a spec's [dataset]."""

    def add(cls: type[DatasetOptions]) -> type[DatasetOptions]:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        DATASETS[name] = cls
        return cls

    return add


def parse_dataset_options(raw: dict) -> Dataset:
    """Validate a spec's [dataset] table against its dataset's options, naming bad fields.
    `name` is a built-in's or an entry point's name, or an import path `package.module:Class`."""
    from dlstore import plugins

    if not isinstance(raw, dict):
        raise SpecError(f"dataset: expected a table, got {type(raw).__name__}")
    name = raw.get("name")
    if name is None:
        known = ", ".join(plugins.known_names("dataset", DATASETS))
        raise SpecError(f"dataset.name: missing; known datasets: {known}")
    if not isinstance(name, str):
        raise SpecError(f"dataset.name: expected a name or an import path, got {name!r}")
    cls = plugins.resolve("dataset", name, DATASETS, Dataset, "dataset.name")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, "dataset")) from None


