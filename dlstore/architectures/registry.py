"""The architecture registry: built-ins by name (`@register_arch`), plugins by import path or
entry point (`dlstore.plugins`); a spec's [model] table is validated against its class.
"""

from __future__ import annotations

import json

from dlstore import plugins
from dlstore.architectures.base import Architecture
from dlstore.errors import NotFoundError, SpecError

ARCHS: dict[str, type[Architecture]] = {}
register_arch = plugins.registrar(ARCHS, "architecture")
# The networks of imported zoos (`dlstore import`: the Model Zoos' CNNs, transformers models):
# `load_model` rebuilds a stored run's from these; a spec cannot name them, since their layers
# (torch's own dropout, fixed image sizes, a library's model) are no cohort-trainable family.
IMPORTED_ARCHS: dict[str, type[Architecture]] = {}
register_imported_arch = plugins.registrar(IMPORTED_ARCHS, "architecture")


def parse_arch_options(raw: dict) -> Architecture:
    """Validate a spec's [model] table against its architecture's options, naming bad fields.
    `arch` is a built-in's or an entry point's name, or an import path `package.module:Class`."""
    if isinstance(raw, dict) and isinstance(raw.get("arch"), str) \
            and raw["arch"] in IMPORTED_ARCHS:
        raise SpecError(f"model.arch: {raw['arch']!r} is the network of imported zoos (dlstore "
                        "import), which load_model rebuilds; a spec cannot train it")
    return plugins.parse_table("architecture", raw, "model", "arch", ARCHS, Architecture)


def run_architecture(run: dict) -> Architecture:
    """The architecture of a stored run (its runs row: `run_id`, and `config` as a dict or JSON
    text). A plugin that is no longer importable is one line naming it; its weights stay
    readable without it (`load_state_dict`)."""
    config = json.loads(run["config"]) if isinstance(run["config"], str) else run["config"]
    if not isinstance(config.get("model"), dict):
        raise NotFoundError(f"run {run['run_id']} records no architecture dlstore can build (a "
                            "tracked run needs `model = {arch = ...}`, `input_shape` and "
                            "`n_classes` in its config); load_state_dict gives its weights, "
                            "load_model(run_id, step, module=MyNet()) loads them into yours")
    name = config["model"].get("arch")
    if isinstance(name, str) and name in IMPORTED_ARCHS:
        return plugins.parse_table("architecture", config["model"], "model", "arch",
                                   IMPORTED_ARCHS, Architecture)
    try:
        return parse_arch_options(config["model"])
    except plugins.PluginImportError as e:
        raise plugins.PluginImportError(f"run {run['run_id']}: {e} (load_state_dict needs no "
                                        "plugin)") from None
    except SpecError as e:
        if isinstance(name, str) and not plugins.is_import_path(name) and "unknown" in str(e):
            # a name an installed plugin registered, and that plugin is gone
            raise plugins.PluginImportError(
                f"run {run['run_id']}: architecture {name!r} is registered by no installed "
                f"package (entry point group dlstore.architectures); {plugins.HOW_TO_IMPORT} "
                "(load_state_dict needs no plugin)") from None
        raise


def run_kernel(run: dict):
    """The cohort kernel of a stored run's network (its runs row, with `input_shape` and
    `n_classes`): what evaluates stacks of its checkpoints."""
    return run_architecture(run).cohort_kernel(*run_shapes(run))


def run_shapes(run: dict) -> tuple[tuple[int, ...], int]:
    """(input shape, classes) of a stored run, which its network is built for."""
    if not run.get("input_shape") or not run.get("n_classes"):
        raise NotFoundError(f"run {run['run_id']} records no input_shape and n_classes (a "
                            "tracked run gives them in its config) to build its network for; "
                            "load_model(run_id, step, module=MyNet()) loads its weights into "
                            "yours")
    return tuple(run["input_shape"]), run["n_classes"]
