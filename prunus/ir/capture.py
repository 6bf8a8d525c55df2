"""Capture a model into a `Graph` with torch.export (non-strict), batch and sequence dims dynamic.

SDPA is traced with its efficient-attention and cuDNN backends disabled. The graph records the
backend-agnostic `scaled_dot_product_attention` op either way (the kernel is chosen when the graph runs),
but tracing runs the chosen backend on symbolic sizes: on CUDA a masked SDPA would go to efficient
attention, which pads the [b, 1, s, s] mask to an aligned stride, and the modulo guards that adds make
export specialise the sequence length to the example's (pytorch/pytorch#124502). Flash attention refuses
masks before looking at sizes, and it is what CPU tracing uses, so CPU graphs are unchanged.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import traceback

import torch
import torch.fx
from torch.export import Dim
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree

from prunus.errors import CaptureError
from prunus.ir.graph import Graph, InputInfo

_TORCH_DIR = os.path.dirname(torch.__file__)


@contextlib.contextmanager
def tracing_context():
    """No autograd, SDPA through flash or math only (module docstring): the context for export, and for any
    fake-tensor propagation over a captured graph that must keep its sizes symbolic."""
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        yield


def _fixed_kwargs(model: torch.nn.Module) -> dict:
    """Keyword arguments captured as constants: a cache object cannot be a graph output."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _dynamic_dims(t: torch.Tensor) -> dict[int, str]:
    """Batch is dim 0 of every input; sequence is dim 1 of token-like inputs ([b, s] ints or [b, s, h] floats)."""
    if t.dim() == 0:
        return {}
    dims = {0: "batch"}
    token_like = (t.dim() == 2 and not t.is_floating_point()) or (t.dim() == 3 and t.is_floating_point())
    if token_like:
        dims[1] = "seq"
    return dims


def _widen_batch(leaves: list) -> list:
    """Example batch 1 would be specialized by export; capture with the batch repeated to 2 instead."""
    tensors = [x for x in leaves if isinstance(x, torch.Tensor) and x.dim() > 0]
    if tensors and all(t.shape[0] == 1 for t in tensors):
        return [torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in leaves]
    return leaves


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch: the model line that failed to capture."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)
              and "/prunus/" not in f.filename]
    if not frames:
        return None
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {f.line}"


_HINTS = [
    ("data-dependent", "the model branches on tensor values; make the branch static or use torch.cond"),
    ("Could not guard on data-dependent", "the model branches on tensor values; make the branch static or use torch.cond"),
    ("unsupported", "replace the unsupported Python construct with tensor ops"),
    ("Constraints violated", "a dimension prunus marks dynamic (batch, sequence) is specialized by the model"),
]


def capture(model: torch.nn.Module, example_inputs) -> Graph:
    """Export `model` at `example_inputs` (positional, as for `model(*example_inputs)`) into a `Graph`."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise CaptureError("example_inputs must be a tuple of positional inputs, "
                           f"as for model(*example_inputs); got {type(example_inputs).__name__}")
    example_inputs = tuple(example_inputs)
    leaves, in_spec = pytree.tree_flatten(example_inputs)
    if not any(isinstance(x, torch.Tensor) for x in leaves):
        raise CaptureError("example_inputs contain no tensor")
    capture_leaves = _widen_batch(leaves)
    args = pytree.tree_unflatten(capture_leaves, in_spec)
    kwargs = _fixed_kwargs(model)
    dyn_args = pytree.tree_unflatten(
        [{d: Dim.AUTO for d in _dynamic_dims(x)} if isinstance(x, torch.Tensor) else None for x in capture_leaves],
        in_spec)
    dynamic_shapes = tuple(dyn_args) + (None,) * len(kwargs)

    was_training = model.training
    model.eval()
    try:
        with tracing_context():
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # noqa: BLE001 - every capture failure becomes one typed error
        first = (str(e).strip().splitlines() or [""])[0][:400]
        where = _user_frame(e)
        hint = next((h for key, h in _HINTS if key in str(e)), "check that the model runs on the example "
                    "inputs and avoids Python control flow on tensor values")
        msg = f"could not capture {type(model).__name__}: {type(e).__name__}: {first}"
        if where:
            msg += f"\n  at {where}"
        msg += f"\n  try: {hint}"
        raise CaptureError(msg) from e
    finally:
        model.train(was_training)
    return graph_from_exported(ep, in_spec=in_spec, leaf_is_tensor=[isinstance(x, torch.Tensor) for x in leaves],
                               dynamic=[_dynamic_dims(x) for x in capture_leaves if isinstance(x, torch.Tensor)],
                               example_inputs=[x for x in capture_leaves if isinstance(x, torch.Tensor)])


def graph_from_exported(ep: torch.export.ExportedProgram, *, in_spec, leaf_is_tensor, dynamic, example_inputs,
                        out_spec="from_program", history=None) -> Graph:
    """Unlift an ExportedProgram into a flat GraphModule (tensors in, tensors out) wrapped as a `Graph`."""
    unlifted = ep.module()
    g = unlifted.graph
    for node in list(g.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            g.erase_node(node)
    tensor_placeholders = []
    for node in list(g.nodes):
        if node.op != "placeholder":
            continue
        if isinstance(node.meta.get("val"), torch.Tensor):
            tensor_placeholders.append(node)
        elif not node.users:
            g.erase_node(node)
        else:
            raise CaptureError(f"non-tensor input '{node.name}' is used by the graph; pass it as a tensor")
    g._codegen = torch.fx.graph.CodeGen()
    gm = torch.fx.GraphModule(unlifted, g)
    fake_mode = next((n.meta["val"].fake_mode for n in tensor_placeholders
                      if hasattr(n.meta["val"], "fake_mode")), None)
    infos = [InputInfo(n.name, n.meta["val"].dim(), n.meta["val"].dtype,
                       {d: name for d, name in dyn.items() if isinstance(n.meta["val"].shape[d], torch.SymInt)})
             for n, dyn in zip(tensor_placeholders, dynamic)]
    if out_spec == "from_program":
        out_spec = ep.call_spec.out_spec
    return Graph(gm, in_spec=in_spec, out_spec=out_spec, leaf_is_tensor=leaf_is_tensor, inputs=infos,
                 example_inputs=example_inputs, fake_mode=fake_mode, history=history)


def reexport(graph: Graph) -> torch.export.ExportedProgram:
    """Export the graph's flat GraphModule again (for saving), keeping its dynamic dims."""
    dyn = tuple({d: Dim.AUTO for d in info.dynamic} for info in graph.inputs)
    with tracing_context():
        return torch.export.export(graph.gm, tuple(graph.example_inputs), dynamic_shapes=dyn, strict=False)
