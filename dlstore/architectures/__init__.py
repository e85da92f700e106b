"""Architectures: the `Architecture` contract (`base`), its registry, the built-ins (`mlp`,
`cnn1d`, `cnn2d`, `resnet`; `modelzoo` and `hf` for imported zoos) and the cohort kernels that
call a stack of members at once (`kernels`)."""

from dlstore.architectures import cnn1d, cnn2d, hf, mlp, modelzoo, resnet  # noqa: F401 - registers the built-ins
