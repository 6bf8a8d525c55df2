"""The pass interface: a registry name, a dataclass of validated params, a kind, and `run`.

Params are plain dataclasses (what the user asks for); the pass class is the handler that applies
them, in the manner of torchao's configs. Each field declares its range or choices with `param()`,
so validation, the registry listing and `SpecError` messages all come from one place.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from prunus.errors import SpecError


def param(default: Any, doc: str, *, range: str | None = None, choices: tuple | None = None):
    """A pass parameter. `range` is interval notation such as "(0, 1]" or "[1, inf)"."""
    meta = {"doc": doc, "range": range, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING \
        else f.default


_INTERVAL = re.compile(r"^\s*([(\[])\s*([^,]+?)\s*,\s*([^,]+?)\s*([)\]])\s*$")


def _in_interval(value: float, interval: str) -> bool:
    lo_br, lo, hi, hi_br = _INTERVAL.match(interval).groups()
    lo, hi = float(lo), float(hi)
    ok_lo = value > lo if lo_br == "(" else value >= lo
    ok_hi = value < hi if hi_br == ")" else value <= hi
    return ok_lo and ok_hi


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    names = {type(None): "none", bool: "true/false", int: "int", float: "float", str: "name", list: "list",
             Any: "value"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp) -> tuple[bool, Any]:
    """Check `value` against annotation `tp`; ints are accepted for floats, bools never for numbers."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for option in typing.get_args(tp):
            ok, v = _coerce(value, option)
            if ok:
                return True, v
        return False, value
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            return False, value
        out = []
        for item in value:
            ok, v = _coerce(item, inner)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


@dataclass(kw_only=True)
class NoParams:
    """Params of a pass that takes none."""


@dataclass(kw_only=True)
class LossyParams:
    """Budget fields every lossy pass accepts; a violated budget raises `VerificationError`."""

    max_kl: float | None = param(None, "largest mean KL(original || optimized) allowed", range="[0, inf)")
    min_top1: float | None = param(None, "smallest top-1 agreement with the original allowed", range="[0, 1]")
    min_sqnr_db: float | None = param(None, "smallest output SQNR (dB) against the original allowed")


@dataclass
class PassResult:
    """What a pass did: whether the graph changed, and notes for the report."""

    modified: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """What the manager hands every pass: example and calibration inputs (flat tensor lists)."""

    example_inputs: list
    calibration: list | None = None


class Pass:
    """Base class of every pass.

    Subclasses set `name`, `Params`, `kind` ("exact" or "lossy"), `requires` (analyses they read),
    `preserves` (analyses still valid after they modify the graph) and `needs_calibration`, and
    implement `run(graph, ctx) -> PassResult`. The first line of the class docstring is its doc.
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    kind: ClassVar[str] = "exact"
    requires: ClassVar[tuple[str, ...]] = ()
    preserves: ClassVar[tuple[str, ...]] = ()
    needs_calibration: ClassVar[bool] = False

    def __init__(self, **params):
        self.params = self.build_params(params)

    @classmethod
    def doc(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def param_fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls.Params))

    @classmethod
    def describe_param(cls, f: dataclasses.Field) -> str:
        hints = typing.get_type_hints(cls.Params)
        meta = f.metadata
        if meta.get("choices"):
            accepted = "one of " + ", ".join(map(str, meta["choices"]))
        else:
            accepted = _type_name(hints[f.name])
            if meta.get("range"):
                accepted += f" in {meta['range']}"
        return accepted

    @classmethod
    def build_params(cls, given: dict, *, text: str | None = None, columns: dict | None = None,
                     pass_column: int | None = None):
        """Validate raw values into `cls.Params`; errors name the pass, key, column and accepted values."""
        columns = columns or {}
        fields = {f.name: f for f in cls.param_fields()}
        hints = typing.get_type_hints(cls.Params)
        values = {}
        for key, raw in given.items():
            col = columns.get(key, pass_column)
            if key not in fields:
                known = ", ".join(fields) or "none (this pass takes no parameters)"
                raise SpecError("unknown parameter", text=text, column=col, pass_name=cls.name, key=key,
                                accepted=known)
            f = fields[key]
            ok, value = _coerce(raw, hints[key])
            accepted = cls.describe_param(f)
            if not ok:
                raise SpecError(f"wrong type: got {raw!r}", text=text, column=col, pass_name=cls.name,
                                key=key, accepted=accepted)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise SpecError(f"unknown value {value!r}", text=text, column=col, pass_name=cls.name,
                                key=key, accepted=accepted)
            interval = f.metadata.get("range")
            if interval and value is not None:
                items = value if isinstance(value, list) else [value]
                if any(not _in_interval(v, interval) for v in items):
                    raise SpecError(f"value {raw!r} out of range", text=text, column=col,
                                    pass_name=cls.name, key=key, accepted=accepted)
            values[key] = value
        try:
            params = cls.Params(**values)
        except TypeError as e:  # a required field was not given
            raise SpecError(str(e), text=text, column=pass_column, pass_name=cls.name) from None
        check = getattr(params, "check", None)
        problem = check() if check is not None else None
        if isinstance(problem, tuple):  # (key, message, accepted values)
            key, message, accepted = problem
            raise SpecError(message, text=text, column=columns.get(key, pass_column), pass_name=cls.name, key=key,
                            accepted=accepted)
        if problem:
            raise SpecError(problem, text=text, column=pass_column, pass_name=cls.name)
        return params

    def param_dict(self) -> dict:
        return dataclasses.asdict(self.params)

    def spec(self) -> str:
        """This pass in pipeline text, with the params that differ from their defaults."""
        args = []
        for f in self.param_fields():
            v = getattr(self.params, f.name)
            if v != default_of(f):
                args.append(f"{f.name}={_format_value(v)}")
        return f"{self.name}({', '.join(args)})" if args else self.name

    def run(self, graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<pass {self.spec()}>"


def _format_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_format_value(x) for x in v) + "]"
    if isinstance(v, str):
        return v if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", v) and v not in ("true", "false") else repr(v)
    return repr(v)
