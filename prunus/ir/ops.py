"""Op classes the analyses share: what moves data without mixing it, and what projects with a weight."""
from __future__ import annotations

import operator

import torch
import torch.fx

aten = torch.ops.aten

# Ops that rearrange, cast, slice, scale or rotate a tensor without mixing it with another projection:
# walking through them from an attention op finds its q/k/v/o projections.
TRANSPARENT = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.t.default, aten.contiguous.default, aten.clone.default, aten._to_copy.default, aten.to.dtype,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default, aten.slice.Tensor,
    aten.select.int, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
    aten.alias.default, aten.dropout.default, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
    aten.add.Tensor, aten.neg.default, aten.cat.default, aten.narrow.default, aten.type_as.default,
    aten.to.dtype_layout, aten.flatten.using_ints, aten.unflatten.int, aten.repeat_interleave.self_int,
    aten.repeat.default, aten.index_select.default, operator.getitem,
}

MATMUL = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default,
          aten.conv1d.default, aten.conv2d.default, aten.baddbmm.default}

ATTENTION = {aten.scaled_dot_product_attention.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
ROPE_MARKERS = {aten.neg.default}
REPEAT = {aten.expand.default, aten.repeat_interleave.self_int, aten.repeat.default}

_WEIGHT_PATH = {aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default, aten.reshape.default,
                aten._to_copy.default, aten.contiguous.default, aten.to.dtype}


def weight_of(graph, node: torch.fx.Node) -> torch.fx.Node | None:
    """The parameter get_attr a matmul-like node multiplies by, or None if it multiplies two activations."""
    if node.op != "call_function" or node.target not in MATMUL:
        return None
    operands = node.args[1:3] if node.target in (aten.addmm.default, aten.baddbmm.default) else node.args[:2]
    for a in operands:
        while isinstance(a, torch.fx.Node) and a.op == "call_function" and a.target in _WEIGHT_PATH:
            a = a.args[0]
        if isinstance(a, torch.fx.Node) and graph.is_parameter(a):
            return a
    return None


def tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Tensor-valued node inputs (not symbolic sizes)."""
    return [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)
            or (isinstance(a.meta.get("val"), (tuple, list)) and a.op == "call_function")]


def is_quantized_linear(node: torch.fx.Node) -> bool:
    """A prunus quantized-linear op (torch.ops.prunus.linear_*), matched by name so ir needs no kernels."""
    t = node.target
    return (node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.namespace == "prunus"
            and t.name().split("::")[-1].startswith("linear_"))


def quantized_linear_shape(node: torch.fx.Node) -> tuple[int, int] | None:
    """(N, K) of the weight a quantized-linear op stands for, from its input and output shapes."""
    if not is_quantized_linear(node):
        return None
    x, out = node.args[0].meta.get("val"), node.meta.get("val")
    if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
        return None
    return int(out.shape[-1]), int(x.shape[-1])
