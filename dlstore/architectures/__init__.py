"""Architectures: the `Architecture` contract (`base`), its registry, the built-ins (`mlp`,
`cnn1d`, `cnn2d`, `resnet`, `transformer`; `modelzoo` and `hf` for imported zoos) and the
cohort kernels that call a stack of members at once (`kernels`)."""

# importing the built-ins registers them
from dlstore.architectures import (  # noqa: F401
    cnn1d,
    cnn2d,
    hf,
    mlp,
    modelzoo,
    resnet,
    transformer,
)
