"""Architectures: the `Architecture` contract (`base`), its registry, the built-ins (`mlp`,
`cnn1d`, `cnn2d`, `resnet`, `transformer`) and the cohort kernels that call a stack of members
at once (`kernels`)."""

# importing the built-ins registers them
from dlstore.architectures import cnn1d, cnn2d, mlp, resnet, transformer  # noqa: F401
