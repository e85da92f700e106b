"""Datasets: the `Dataset` contract and a run's data (`base`), the registry and the built-ins."""

from dlstore.datasets import builtin  # noqa: F401 - registers the built-ins
