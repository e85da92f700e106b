"""The dataset registry: built-ins by name (`@register_dataset`), plugins by import path or entry
point (`dlstore.plugins`); a spec's [dataset] table is validated against its class.
"""

from __future__ import annotations

from dlstore import plugins
from dlstore.datasets.base import Dataset

DATASETS: dict[str, type[Dataset]] = {}
register_dataset = plugins.registrar(DATASETS, "dataset")


def parse_dataset_options(raw: dict) -> Dataset:
    """Validate a spec's [dataset] table against its dataset's options, naming bad fields.
    `name` is a built-in's or an entry point's name, or an import path `package.module:Class`."""

    return plugins.parse_table("dataset", raw, "dataset", "name", DATASETS, Dataset)
