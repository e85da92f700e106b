"""Where a spec's names of architectures, datasets and metric families come from: the built-in
registries, installed packages' entry points, or an import path.

A name that contains ':' is an import path, `package.module:Class`, imported as it stands; any
other name is looked up among the built-ins and then the entry points that installed packages
declare in the groups `dlstore.architectures`, `dlstore.datasets` and `dlstore.metrics`
(importlib.metadata). The built-ins are registered the same way a plugin's class is found, so
nothing downstream tells them apart.

Kept free of torch so that `import dlstore` stays fast.
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points

from dlstore.errors import DlstoreError, SpecError

GROUPS = {"architecture": "dlstore.architectures", "dataset": "dlstore.datasets",
          "metric family": "dlstore.metrics"}
HOW_TO_IMPORT = "pip install it or add its directory to PYTHONPATH"


class PluginImportError(DlstoreError):
    """A spec or a stored run names a plugin whose module cannot be imported."""


def is_import_path(name: str) -> bool:
    return ":" in name


@functools.lru_cache(maxsize=8)
def _entry_points(group: str) -> dict:
    # cached: scanning every distribution's metadata costs milliseconds, and a spec names its
    # architecture once per grid value
    return {ep.name: ep for ep in entry_points(group=group)}


def clear_cache() -> None:
    """Forget the entry points seen so far (a test that installs a plugin while running)."""
    _entry_points.cache_clear()
    _import_path.cache_clear()


def registrar(builtins: dict, kind: str):
    """The class decorator `@register_<kind>(name)` that adds a built-in to `builtins`; a name
    registered twice is a programming error."""
    def register(name: str):
        def add(cls: type) -> type:
            if name in builtins:
                raise ValueError(f"{kind} {name!r} is already registered")
            builtins[name] = cls
            return cls

        return add

    return register


def known_names(kind: str, builtins: dict) -> list[str]:
    return sorted(set(builtins) | set(_entry_points(GROUPS[kind])))


def resolve(kind: str, name: str, builtins: dict, base: type, field: str) -> type:
    """The class a spec's `name` of an architecture / dataset stands for; a SpecError (or a
    PluginImportError) in one line otherwise."""
    if is_import_path(name):
        cls = _import_path(name, field)
    elif name in builtins:
        return builtins[name]
    elif name in _entry_points(GROUPS[kind]):
        ep = _entry_points(GROUPS[kind])[name]
        try:
            cls = ep.load()
        except ImportError as e:
            raise PluginImportError(
                f"{field}: the {kind} {name!r} (entry point {ep.value!r} in group "
                f"{GROUPS[kind]}) cannot be imported: {e}") from None
    else:
        raise SpecError(f"{field}: unknown {kind} {name!r}; known: "
                        f"{', '.join(known_names(kind, builtins))}, or an import path "
                        "'package.module:Class'")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise SpecError(f"{field}: {name!r} is not a subclass of dlstore.{base.__name__}")
    return cls


@functools.lru_cache(maxsize=64)
def _import_path(path: str, field: str) -> object:
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise SpecError(f"{field}: {path!r} is not an import path 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginImportError(f"{field}: cannot import module {module_name!r} (for {path!r}): "
                                f"{e}; {HOW_TO_IMPORT}") from None
    try:
        return functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        raise SpecError(f"{field}: module {module_name!r} has no {attribute!r}") from None


def parse_table(kind: str, raw: object, section: str, key: str, builtins: dict, base: type):
    """Validate a spec's table (`[section]`) against the options of the class its `key` names
    (a built-in's or an entry point's name, or an import path `package.module:Class`), naming
    bad fields in one line."""
    from pydantic import ValidationError

    from dlstore.errors import format_validation_error

    if not isinstance(raw, dict):
        raise SpecError(f"{section}: expected a table, got {type(raw).__name__}")
    name = raw.get(key)
    if name is None:
        raise SpecError(f"{section}.{key}: missing; known {kind}s: "
                        f"{', '.join(known_names(kind, builtins))}")
    if not isinstance(name, str):
        raise SpecError(f"{section}.{key}: expected a name or an import path, got {name!r}")
    cls = resolve(kind, name, builtins, base, f"{section}.{key}")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, section)) from None
