"""The pass registry: name -> pass class. Tests parametrize over it, so a registered pass is covered."""
from __future__ import annotations

from prunus.errors import SpecError
from prunus.passes.base import Pass
from prunus.passes.parser import parse_pipeline

_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under `cls.name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    """Every registered pass by name; each class has `.doc()` and `.param_fields()`."""
    return dict(sorted(_REGISTRY.items()))


def build_pipeline(passes) -> list[Pass]:
    """Turn pipeline text, a Pass, or a list of Pass objects / pipeline strings into Pass objects."""
    if isinstance(passes, Pass):
        return [passes]
    if isinstance(passes, str):
        out = []
        for spec in parse_pipeline(passes):
            cls = _REGISTRY.get(spec.name)
            if cls is None:
                raise SpecError(f"unknown pass '{spec.name}'", text=passes, column=spec.column,
                                accepted=", ".join(sorted(_REGISTRY)))
            p = cls.__new__(cls)
            p.params = cls.build_params(spec.args, text=passes, columns=spec.arg_columns,
                                        pass_column=spec.column)
            out.append(p)
        return out
    if isinstance(passes, (list, tuple)):
        out = []
        for i, item in enumerate(passes):
            if isinstance(item, Pass):
                out.append(item)
            elif isinstance(item, str):
                out.extend(build_pipeline(item))
            else:
                raise SpecError(f"pipeline entry {i} is a {type(item).__name__}, not a pass or pipeline text")
        if not out:
            raise SpecError("empty pipeline: name at least one pass")
        return out
    raise SpecError(f"passes must be pipeline text or a list of passes, got {type(passes).__name__}")
