"""Readable text and JSON views of a `Graph`: one line per op with shapes and dtypes, grouped by module."""
from __future__ import annotations

import json

import torch
import torch.fx

from prunus.ir.flops import node_flops

_DTYPE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
          torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "bool",
          torch.float8_e4m3fn: "f8e4m3"}


def _dim(size, names: dict) -> str:
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return str(expr.xreplace({s: __import__("sympy").Symbol(n) for s, n in names.items()}))
    return str(size)


def format_val(val, names: dict | None = None) -> str:
    names = names or {}
    if isinstance(val, torch.Tensor):
        return f"{_DTYPE.get(val.dtype, str(val.dtype))}[{', '.join(_dim(s, names) for s in val.shape)}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(format_val(v, names) for v in val) + ")"
    if isinstance(val, torch.SymInt):
        return "sym " + _dim(val, names)
    return "" if val is None else repr(val)


def _target(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        name = t.name().replace("::", ".")
        return name[:-len(".default")] if name.endswith(".default") else name
    if isinstance(t, torch._ops.HigherOrderOperator):
        return f"hop.{t.name()}"
    return getattr(t, "__name__", str(t))


def _arg(a, names: dict | None = None) -> str:
    """An argument as text; symbolic sizes print as their expression (`seq`) when `names` is given."""
    if isinstance(a, torch.fx.Node):
        if a.op == "get_attr":
            return a.target
        val = a.meta.get("val")
        if names is not None and isinstance(val, torch.SymInt):
            return _dim(val, names)
        return a.name
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_arg(x, names) for x in a) + "]"
    if isinstance(a, float):
        return f"{a:.6g}"
    return repr(a)


def _module(node: torch.fx.Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    for path, ty in reversed(list(stack.values())):
        if not path.startswith("_empty_nn_module_stack"):
            ty = ty if isinstance(ty, str) else getattr(ty, "__name__", str(ty))
            return path, ty.rsplit(".", 1)[-1]
    return "", ""


def _fmt_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def to_text(graph) -> str:
    """One line per op, `name = op(args) : dtype[shape]`, under a header per module path."""
    names = graph.symbol_names()
    lines = [f"# prunus graph: {len(graph.inputs)} input(s), {_fmt_count(graph.num_parameters())} parameters"]
    for node, info in zip(graph.placeholders(), graph.inputs):
        lines.append(f"input {node.name}: {format_val(node.meta.get('val'), names)}")
    current = None
    for node in graph.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        path, ty = _module(node)
        if path != current:
            current = path
            lines.append(f"{path or '<top>'}" + (f" ({ty})" if ty else ""))
        args = [_arg(a, names) for a in node.args] + [f"{k}={_arg(v, names)}" for k, v in node.kwargs.items()]
        lines.append(f"  {node.name} = {_target(node)}({', '.join(args)}) : "
                     f"{format_val(node.meta.get('val'), names)}")
    out = graph.output_node()
    for name, a in zip(graph.output_names(), torch.utils._pytree.tree_leaves(out.args[0])):
        val = a.meta.get("val") if isinstance(a, torch.fx.Node) else a
        lines.append(f"output {name} = {_arg(a)} : {format_val(val, names)}")
    if graph.history:
        lines.append("history:")
        lines.extend(f"  {i + 1}. {h['spec']}" for i, h in enumerate(graph.history))
    return "\n".join(lines) + "\n"


def to_dict(graph) -> dict:
    names = graph.symbol_names()
    nodes = []
    for node in graph.graph.nodes:
        val = node.meta.get("val")
        path, ty = _module(node)
        nodes.append({
            "name": node.name, "op": node.op, "target": _target(node) if node.op == "call_function" else str(node.target),
            "args": [_arg(a, names) for a in node.args], "kwargs": {k: _arg(v, names) for k, v in node.kwargs.items()},
            "type": format_val(val, names), "module": path, "module_type": ty, "flops": node_flops(node),
        })
    return {
        "inputs": [{"name": n.name, "type": format_val(n.meta.get("val"), names)} for n in graph.placeholders()],
        "outputs": graph.output_names(),
        "parameters": [{"name": n, "shape": list(s), "dtype": _DTYPE.get(d, str(d)), "numel": k}
                       for n, s, d, k in graph.param_table()],
        "num_parameters": graph.num_parameters(),
        "nodes": nodes,
        "history": graph.history,
    }


def to_json(graph) -> str:
    return json.dumps(to_dict(graph), indent=1, default=str)
