"""`quantize`: replace linear ops by prunus quantized-linear ops holding packed weights and scales.

Schemes: int8_weight (per channel), int4_weight (groups along the input dim, asymmetric), w8a8 (per-token
dynamic activations, per-channel weights) and fp8 (e4m3). Methods: rtn and hqq need no data; gptq, awq
and smoothquant read statistics of each layer's input over the calibration set. Embeddings are gathers,
not linears, so they are never touched; the output head is skipped unless `include_head=true`.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
import torch.fx

from prunus.ir.graph import module_path
from prunus.ir.ops import weight_of
from prunus.passes.base import LossyParams, Pass, PassResult, param
from prunus.passes.quant.awq import awq, awq_apply, awq_scale
from prunus.passes.quant.encode import encode
from prunus.passes.quant.gptq import gptq
from prunus.passes.quant.hqq import hqq
from prunus.passes.quant.rtn import rtn
from prunus.passes.quant.smoothquant import smoothquant
from prunus.passes.registry import register
from prunus.passes.stats import collect_input_stats

aten = torch.ops.aten

METHODS = {"rtn": rtn, "gptq": gptq, "awq": awq, "hqq": hqq, "smoothquant": smoothquant}
# Which methods make sense for which scheme.
VALID = {"int8_weight": ("rtn", "gptq", "awq"), "int4_weight": ("rtn", "gptq", "awq", "hqq"),
         "w8a8": ("rtn", "smoothquant"), "fp8": ("rtn",)}
CALIBRATED = {"gptq", "awq", "smoothquant"}


def _ops():
    import prunus.kernels  # noqa: F401  (registers torch.ops.prunus.*)

    p = torch.ops.prunus
    return {"int4_weight": p.linear_int4.default, "int8_weight": p.linear_int8.default,
            "w8a8": p.linear_w8a8.default, "fp8": p.linear_fp8.default}


@dataclass(kw_only=True)
class QuantizeParams(LossyParams):
    scheme: str = param("int4_weight", "number format of the weights (and activations for w8a8)",
                        choices=tuple(VALID))
    method: str = param("rtn", "how weights are rounded", choices=tuple(METHODS))
    group_size: int = param(128, "input channels sharing one int4 scale and zero point (int4_weight; the GPU "
                            "kernels take powers of two, other even sizes run the op's reference)", range="[8, 4096]")
    include: list[str] = param([], "only linears whose module path matches one of these (glob or substring)")
    exclude: list[str] = param([], "skip linears whose module path matches one of these (glob or substring)")
    include_head: bool = param(False, "also quantize the output head (the last linear before an output)")
    include_embeddings: bool = param(False, "also store embedding tables as int8 per row, whatever the scheme "
                                            "(a lookup reads few rows: 4 bits would save memory, not time)")
    symmetric: bool = param(False, "int4_weight: zero point 8 and scale 2 max|w| / 15 a group (GPTQ's sym) "
                                   "instead of min-max; int8, w8a8 and fp8 are symmetric already")

    def check(self) -> tuple[str, str, str] | None:
        if self.method not in VALID[self.scheme]:
            return ("method", f"'{self.method}' does not apply to scheme '{self.scheme}'",
                    ", ".join(VALID[self.scheme]))
        if self.symmetric and self.method == "hqq":
            return "symmetric", "hqq optimizes its zero points: it has no symmetric grid", "false"
        if self.scheme == "int4_weight" and self.group_size % 2:
            return "group_size", f"{self.group_size} is odd: two int4 values share a byte", "even in [8, 4096]"
        return None


def _matches(path: str, patterns: list[str]) -> bool:
    return any(p in path or fnmatch.fnmatch(path, p) for p in patterns)


def _head_nodes(graph) -> set:
    """Linears whose result reaches a graph output through data movement only (the LM / classifier head)."""
    from prunus.ir.ops import TRANSPARENT

    heads, out = set(), graph.output_node()
    stack = [a for a in torch.utils._pytree.tree_leaves(out.args[0]) if isinstance(a, torch.fx.Node)]
    seen = set()
    while stack:
        n = stack.pop()
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        if weight_of(graph, n) is not None:
            heads.add(n)
        elif n.target in TRANSPARENT:
            stack.extend(n.all_input_nodes)
    return heads


def embedding_targets(graph, include: list[str], exclude: list[str]) -> list[torch.fx.Node]:
    """aten.embedding nodes whose table is a parameter, filtered by module path like the linears."""
    found = []
    for n in graph.graph.nodes:
        if (n.op != "call_function" or n.target != aten.embedding.default or not isinstance(n.args[0], torch.fx.Node)
                or not graph.is_parameter(n.args[0])):
            continue
        path = module_path(n)
        if (include and not _matches(path, include)) or (exclude and _matches(path, exclude)):
            continue
        found.append(n)
    return found


def linear_targets(graph, include: list[str], exclude: list[str], include_head: bool) -> list[torch.fx.Node]:
    """aten.linear / addmm nodes with a parameter weight, filtered by module path."""
    heads = set() if include_head else _head_nodes(graph)
    found = []
    for n in graph.graph.nodes:
        if n.op != "call_function" or n.target not in (aten.linear.default, aten.addmm.default):
            continue
        if weight_of(graph, n) is None or n in heads:
            continue
        if n.target == aten.addmm.default and not (isinstance(n.args[2], torch.fx.Node)
                                                     and graph.is_parameter(n.args[2])):
            continue
        # a linear `fuse(merge_linears=true)` made of siblings answers for each of them: all must be included,
        # none excluded (part of one matmul cannot be quantized apart)
        paths = n.meta.get("merged_paths") or [module_path(n)]
        if include and not all(_matches(path, include) for path in paths):
            continue
        if exclude and any(_matches(path, exclude) for path in paths):
            continue
        found.append(n)
    return found


def _operands(graph, n: torch.fx.Node):
    """(input node, weight [N, K] tensor, bias node or None) of a linear or addmm(bias, x, W[K, N])."""
    if n.target == aten.linear.default:
        bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        return n.args[0], graph.get_attr_value(n.args[1]), bias
    return n.args[1], graph.get_attr_value(n.args[2]).t(), n.args[0]


def _buffer_prefix(n: torch.fx.Node) -> str:
    return re.sub(r"\W", "_", module_path(n) or n.name) + "_"


@register
class Quantize(Pass):
    """Replace linears by quantized-linear ops (int8/int4 weights, W8A8, FP8) with packed weights."""

    name = "quantize"
    kind = "lossy"
    Params = QuantizeParams

    @property
    def needs_calibration(self) -> bool:
        return self.params.method in CALIBRATED

    def run(self, graph, ctx) -> PassResult:
        p = self.params
        targets = linear_targets(graph, p.include, p.exclude, p.include_head)
        tables = embedding_targets(graph, p.include, p.exclude) if p.include_embeddings else []
        table_notes = [f"{len(tables)} embeddings -> int8 per row"] if tables else []
        table_nodes = {n.args[0]: None for n in tables}
        for n in tables:
            self._replace_embedding(graph, n)
        tied = [t for t in table_nodes if any(u not in targets for u in t.users)]
        if tied:  # a tied output head (left in float, or not a linear) still reads the float table
            table_notes.append(f"{', '.join(t.target for t in tied)}: also read by the float output head (tied), so "
                               "the float table stays beside its int8 copy; include_head=true quantizes the head too")
        if not targets:
            return PassResult(modified=bool(tables), notes=table_notes or ["no linear matched"])
        op = _ops()[p.scheme]
        stats = {}
        if p.method in CALIBRATED:
            watched = {n: (1 if n.target == aten.addmm.default else 0) for n in targets}
            stats = collect_input_stats(graph, ctx.calibration, watched, hessian=p.method == "gptq")
        method = METHODS[p.method]
        extra = {"symmetric": True} if p.symmetric and p.scheme == "int4_weight" else {}
        awq_scales = self._awq_scales(graph, targets, stats, extra) if p.method == "awq" else {}
        scaled_inputs = {}  # (input node, AWQ scale) -> the node of input * (1 / scale), shared by the siblings
        for n in targets:
            x, weight, bias = _operands(graph, n)
            w = weight.detach().float()
            if p.method == "awq":
                q = awq_apply(w, p.scheme, p.group_size, weight.dtype, awq_scales[n], **extra)
            else:
                q = method(w, p.scheme, p.group_size, weight.dtype, stats.get(n), **extra)
            self._replace(graph, n, x, bias, q, op, scaled_inputs, id(awq_scales.get(n)))
        notes = [f"{len(targets)} linears -> {p.scheme} ({p.method})"] + table_notes
        if p.scheme == "fp8":
            notes.append("fp8 runs e4m3 matmuls on Hopper GPUs (sm_90) only; elsewhere the op dequantizes its weight "
                         "on every call (the reference)")
        return PassResult(modified=True, notes=notes)

    def _replace_embedding(self, graph, n) -> None:
        import prunus.kernels  # noqa: F401  (registers torch.ops.prunus.*)

        g, table = graph.graph, graph.get_attr_value(n.args[0])
        q = encode("int8_weight", table.detach().float(), 0, table.dtype)
        prefix = _buffer_prefix(n)
        with g.inserting_before(n):
            qweight, scales = (g.get_attr(graph.add_constant(t, prefix + name))
                               for t, name in zip(q.tensors, ("qweight", "scales")))
            new = g.call_function(torch.ops.prunus.embedding_int8.default, (n.args[1], qweight, scales))
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        g.erase_node(n)

    def _awq_scales(self, graph, targets, stats, extra) -> dict:
        """One AWQ scale for the linears that read one input (q/k/v, gate/up), searched over their weights
        stacked (the error over the stacked outputs is the sum of theirs)."""
        p, siblings = self.params, {}
        for n in targets:
            siblings.setdefault(_operands(graph, n)[0], []).append(n)
        scales = {}
        for members in siblings.values():
            w = torch.cat([_operands(graph, m)[1].detach().float() for m in members])
            s = awq_scale(w, p.scheme, p.group_size, stats[members[0]], **extra)
            scales.update((m, s) for m in members)
        return scales

    def _replace(self, graph, n, x, bias, q, op, scaled_inputs: dict, scale_key) -> None:
        g = graph.graph
        prefix = _buffer_prefix(n)
        names = ["qweight", "scales", "zeros"]
        with g.inserting_before(n):
            attrs = [g.get_attr(graph.add_constant(t, prefix + names[i])) for i, t in enumerate(q.tensors)]
            if q.input_scale is not None and (x, scale_key) in scaled_inputs:
                x = scaled_inputs[x, scale_key]
            elif q.input_scale is not None:
                scale = g.get_attr(graph.add_constant(q.input_scale, prefix + "input_scale"))
                mul = scaled_inputs[x, scale_key] = g.call_function(aten.mul.Tensor, (x, scale))
                mul.meta.update({k: v for k, v in x.meta.items() if k == "nn_module_stack"})
                x = mul
            if q.scheme == "int4_weight":
                args = (x, *attrs, bias, self.params.group_size)
            elif q.scheme == "w8a8":
                smooth = g.get_attr(graph.add_constant(q.smooth, prefix + "smooth")) if q.smooth is not None else None
                args = (x, *attrs, smooth, bias)
            else:
                args = (x, *attrs, bias)
            new = g.call_function(op, args)
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        g.erase_node(n)
