"""Architectures: the `Architecture` contract (`base`), its registry, the built-ins (`mlp`,
`cnn1d`) and the cohort kernels that call a stack of members at once (`kernels`)."""

from dlstore.architectures import cnn1d, mlp  # noqa: F401 - registers the built-ins
