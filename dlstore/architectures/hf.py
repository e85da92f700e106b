"""Networks of the Hugging Face `transformers` library, rebuilt from a model's `config.json`:
what checkpoint suites imported with `dlstore import hf` load as (`load_model`).

The options hold the config.json as it was (`config`); `build` makes the class its
`architectures` list names (`GPTNeoXForCausalLM` for Pythia), with random weights that
`load_model` then replaces (through transformers' own loading, which knows the hub's names
for its modules' tensors). `transformers` is an optional extra: without it the weights stay
readable (`load_state_dict`, `Store.weights`), and `load_model` says what to install.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import nn

from dlstore.architectures.base import Architecture
from dlstore.architectures.registry import register_imported_arch
from dlstore.errors import UsageError


@register_imported_arch("hf")
class HFOptions(Architecture):
    arch: Literal["hf"]
    config: dict[str, Any] = Field(description="the model's config.json")

    def build(self, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
        try:
            import transformers
        except ImportError:
            raise UsageError("load_model of a Hugging Face checkpoint needs `transformers` "
                             "(pip install 'dlstore[hf]'); load_state_dict needs nothing"
                             ) from None
        config = dict(self.config)
        model_type = config.pop("model_type", None)
        if not isinstance(model_type, str):
            raise UsageError("the run's config.json names no model_type; load_state_dict gives "
                             "its weights")
        names = config.get("architectures") or []
        cls = getattr(transformers, names[0], None) if names else None
        if cls is None:
            raise UsageError(f"transformers has no model class {names[:1] or '(none named)'} "
                             "for this run's config.json; load_state_dict gives its weights")
        hf_config = transformers.AutoConfig.for_model(model_type, **config)
        model = cls(hf_config)

        def from_checkpoint_names(module, state, prefix, *_):
            # a checkpoint's names are the hub's (Pythia's `embed_out`, tied heads left out),
            # which transformers maps onto its modules' when it loads: let it
            if prefix or set(state) == set(module.state_dict()):
                return
            loaded = cls.from_pretrained(None, config=hf_config, state_dict=dict(state))
            state.clear()
            state.update(loaded.state_dict())

        model.register_load_state_dict_pre_hook(from_checkpoint_names)
        return model
