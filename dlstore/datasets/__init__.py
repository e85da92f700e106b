"""Datasets: the `Dataset` contract and a run's data (`base`), the registry, the built-ins and
the real image datasets (`images`)."""

from dlstore.datasets import builtin, images, sequences  # noqa: F401 - registers the built-ins
