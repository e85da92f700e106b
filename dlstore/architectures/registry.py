"""The architecture registry: built-ins by name (`@register_arch`), plugins by import path or
entry point (`dlstore.plugins`); a spec's [model] table is validated against its class.
"""

from __future__ import annotations

from pydantic import ValidationError

from dlstore.architectures.base import Architecture
from dlstore.errors import SpecError, format_validation_error

ARCHS: dict[str, type[Architecture]] = {}


def register_arch(name: str):
    def add(cls: type[Architecture]) -> type[Architecture]:
        ARCHS[name] = cls
        return cls

    return add


def parse_arch_options(raw: dict) -> Architecture:
    """Validate a spec's [model] table against its architecture's options, naming bad fields.
    `arch` is a built-in's or an entry point's name, or an import path `package.module:Class`."""
    from dlstore import plugins

    if not isinstance(raw, dict):
        raise SpecError(f"model: expected a table, got {type(raw).__name__}")
    name = raw.get("arch")
    if name is None:
        known = ", ".join(plugins.known_names("architecture", ARCHS))
        raise SpecError(f"model.arch: missing; known architectures: {known}")
    if not isinstance(name, str):
        raise SpecError(f"model.arch: expected a name or an import path, got {name!r}")
    cls = plugins.resolve("architecture", name, ARCHS, Architecture, "model.arch")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, "model")) from None
