"""An IR view (the dict shape of `prunus.ir.printer.to_dict`) of an ONNX file, for `prunus dump`.

Shapes come from `onnx.shape_inference`. The module path of each node comes from the metadata the torch
dynamo exporter writes (`pkg.torch.onnx.name_scopes`: the module stack, then the fx node), or from the
TorchScript exporter's node names ('/model/layers.0/self_attn/q_proj/MatMul'). ONNX does not tell
parameters from constants: floating-point initializers of more than one element count as parameters, and
each belongs to the module of the first node that reads it.
"""
from __future__ import annotations

import ast
import math
import re

from prunus.errors import ArtifactError

_DTYPE = {1: "f32", 2: "u8", 3: "i8", 5: "i16", 6: "i32", 7: "i64", 9: "bool", 10: "f16", 11: "f64",
          16: "bf16", 17: "f8e4m3", 19: "f8e5m2", 21: "u4", 22: "i4"}
_FLOAT = {1, 10, 11, 16, 17, 19}
# Capture names dims this way; the dynamo exporter calls them s0, s1, ...
_INPUT_DIM_NAMES = ("batch", "seq")


def _dims(shape) -> list[str]:
    return [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def _type(value_type, names: dict) -> str:
    if not value_type.HasField("tensor_type"):
        return ""
    tt = value_type.tensor_type
    dtype = _DTYPE.get(tt.elem_type, f"t{tt.elem_type}")
    if not tt.HasField("shape"):
        return f"{dtype}[?]"
    return f"{dtype}[{', '.join(_rename(d, names) for d in _dims(tt.shape))}]"


def _rename(dim: str, names: dict) -> str:
    return re.sub(r"\b\w+\b", lambda m: names.get(m.group(0), m.group(0)), dim) if names else dim


def _module(node) -> tuple[str, str]:
    """(module path, module class name) of an ONNX node, '' where the file does not say."""
    meta = {p.key: p.value for p in node.metadata_props}
    if "pkg.torch.onnx.name_scopes" in meta:
        try:
            scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
            classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
        except (ValueError, SyntaxError):
            return "", ""
        for i in range(len(scopes) - 2, -1, -1):  # the last scope is the fx node itself
            if scopes[i] and not scopes[i].startswith("_empty_nn_module_stack"):
                cls = classes[i] if i < len(classes) else ""
                return scopes[i], cls.rsplit(".", 1)[-1]
        return "", ""
    if node.name.startswith("/"):
        return ".".join(p for p in node.name.split("/")[1:-1] if p), ""
    return "", ""


def _size(dim: str) -> int:
    return int(dim) if dim.isdigit() else 1


def _flops(node, shapes: dict) -> int:
    """2*M*N*K for MatMul-like ops and convolutions; symbolic sizes count as 1."""
    out = [_size(d) for d in shapes.get(node.output[0], [])] if node.output else []
    if not out:
        return 0
    if node.op_type in ("MatMul", "MatMulInteger", "Gemm", "FusedMatMul"):
        a = shapes.get(node.input[0], [])
        if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
            a = a[::-1]
        return 2 * math.prod(out) * (_size(a[-1]) if a else 1)
    if node.op_type == "MatMulNBits":
        k = next((at.i for at in node.attribute if at.name == "K"), 1)
        return 2 * math.prod(out) * k
    if node.op_type == "Conv":
        w = shapes.get(node.input[1], [])
        return 2 * math.prod(out) * math.prod(_size(d) for d in w[1:])
    return 0


def _attr(attribute) -> str:
    import onnx

    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return repr(value.decode(errors="replace"))
    if isinstance(value, onnx.TensorProto):
        return f"tensor{list(value.dims)}"
    if isinstance(value, onnx.GraphProto):
        return f"graph({value.name})"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


def onnx_view(path: str) -> tuple[dict, str]:
    """The view of the ONNX file at `path`, and the sizes its FLOPs were counted at."""
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # noqa: BLE001 - protobuf and onnx raise many kinds for a bad file
        raise ArtifactError(f"cannot read {path} as ONNX: {type(e).__name__}: {e}") from e
    g = model.graph
    init = {t.name: t for t in g.initializer}
    inputs = [i for i in g.input if i.name not in init]
    names = {}
    for i in inputs:
        if i.type.HasField("tensor_type") and i.type.tensor_type.HasField("shape"):
            for d, dim in enumerate(_dims(i.type.tensor_type.shape)):
                if not dim.isdigit() and dim != "?" and dim not in names and d < len(_INPUT_DIM_NAMES):
                    names[dim] = _INPUT_DIM_NAMES[d]
    types = {v.name: _type(v.type, names) for v in list(g.value_info) + list(g.input) + list(g.output)}
    shapes = {v.name: _dims(v.type.tensor_type.shape) for v in list(g.value_info) + list(g.input) + list(g.output)
              if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    shapes.update({name: [str(d) for d in t.dims] for name, t in init.items()})

    nodes = [{"name": i.name, "op": "placeholder", "target": i.name, "args": [], "kwargs": {},
              "type": types.get(i.name, ""), "module": "", "module_type": "", "flops": 0} for i in inputs]
    owner = {}
    for node in g.node:
        module, module_type = _module(node)
        target = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        out_types = [types.get(o, "") for o in node.output]
        nodes.append({"name": ", ".join(node.output) or node.name, "op": "call_function", "target": target,
                      "args": list(node.input), "kwargs": {a.name: _attr(a) for a in node.attribute},
                      "type": out_types[0] if len(out_types) == 1 else f"({', '.join(out_types)})",
                      "module": module, "module_type": module_type, "flops": _flops(node, shapes)})
        for name in node.input:
            owner.setdefault(name, module)
    nodes.append({"name": "output", "op": "output", "target": "output", "args": [o.name for o in g.output],
                  "kwargs": {}, "type": "", "module": "", "module_type": "", "flops": 0})
    parameters = [{"name": name, "shape": list(t.dims), "dtype": _DTYPE.get(t.data_type, f"t{t.data_type}"),
                   "numel": math.prod(t.dims), "module": owner.get(name, "")}
                  for name, t in init.items() if t.data_type in _FLOAT and math.prod(t.dims) > 1]
    view = {"inputs": [{"name": i.name, "type": types.get(i.name, "")} for i in inputs],
            "outputs": [o.name for o in g.output], "parameters": parameters,
            "num_parameters": sum(p["numel"] for p in parameters), "nodes": nodes, "history": []}
    return view, "symbolic sizes = 1"
