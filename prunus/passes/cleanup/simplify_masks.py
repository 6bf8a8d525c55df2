"""`simplify_masks`: replace attention masks that depend only on sequence length by SDPA's own flags.

Hugging Face models materialise a [b, 1, s, s] mask (from arange/index/le ops) even when it is plainly
causal or all-visible. A mask whose computation reads the inputs only through their sizes is evaluated
at several sizes (including just past every integer literal in its computation, so a sliding window is
seen); if it is causal everywhere it becomes `is_causal=True`, if all-visible it is dropped.
"""
from __future__ import annotations

import torch
import torch.fx

from prunus.ir.ops import ATTENTION
from prunus.passes.base import Pass, PassResult
from prunus.passes.cleanup.dce import eliminate_dead_code
from prunus.passes.registry import register

aten = torch.ops.aten
_SIZE_OPS = {aten.sym_size.int}
_BASE_SIZES = (2, 3, 5, 17)
_MAX_SIZE = 4500  # the mask is [s, s]: keep the largest probe in memory


def shape_only_ancestors(mask: torch.fx.Node) -> set | None:
    """The nodes `mask` is computed from, or None if it reads an input's values (not only its sizes)."""
    seen, sized, stack = set(), set(), [mask]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return None
        if n.op == "call_function" and n.target in _SIZE_OPS and n.args[0].op == "placeholder":
            sized.add(n.args[0])  # only the input's size is read; a value path to it still rejects the mask
            continue
        # the size of an intermediate tensor (e.g. tokens gathered by a drop_tokens point) depends on how it was
        # computed: walk it like any other operand
        stack.extend(n.all_input_nodes)
    return seen | sized


def _classify(mask: torch.Tensor) -> str | None:
    """'causal', 'full' or None for a bool (True = attend) or additive float mask."""
    if mask.dtype == torch.bool:
        attend = mask
    elif mask.is_floating_point():
        attend = mask == 0
        if not bool(((mask == 0) | (mask <= -1e4)).all()):
            return None
    else:
        return None
    lq, lk = attend.shape[-2], attend.shape[-1]
    if bool(attend.all()):
        return "full"
    causal = torch.ones(lq, lk, dtype=torch.bool, device=attend.device).tril()
    if lq == lk and bool((attend == causal).all()):
        return "causal"
    return None


def _probe_sizes(nodes: set, upper: int) -> list[int]:
    sizes = set(_BASE_SIZES)
    for n in nodes:
        for a in torch.utils._pytree.tree_leaves((n.args, n.kwargs)):
            if isinstance(a, int) and not isinstance(a, bool) and 16 < a < _MAX_SIZE:
                sizes.update((a + 2, a - 1))
    return sorted(s for s in sizes if 2 <= s <= upper)


def _evaluate(graph, nodes: set, masks: list, seq: int) -> list:
    """Run the sub-graph that computes `masks` with inputs of sequence length `seq` (batch 2), each on its
    example input's device (the graph's factory ops name that device, and the default device may differ)."""
    sub = torch.fx.Graph()
    env = {}
    for n in graph.graph.nodes:
        if n in nodes:
            env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[m] for m in masks))
    module = torch.fx.GraphModule(graph.gm, sub)
    inputs = []
    for ph, info in zip(graph.placeholders(), graph.inputs):
        if ph not in nodes:
            continue
        example = graph.example_inputs[graph.placeholders().index(ph)]
        shape = list(example.shape)
        for dim, name in info.dynamic.items():
            shape[dim] = 2 if name == "batch" else seq
        inputs.append(torch.zeros(shape, dtype=info.dtype, device=example.device))
    with torch.no_grad():
        return list(module(*inputs))


def _seq_upper(graph) -> int:
    env = getattr(graph.fake_mode, "shape_env", None)
    upper = _MAX_SIZE
    for ph, info in zip(graph.placeholders(), graph.inputs):
        for dim, name in info.dynamic.items():
            size = ph.meta["val"].shape[dim]
            if name == "seq" and env is not None and isinstance(size, torch.SymInt):
                rng = env.var_to_range.get(size.node.expr)
                if rng is not None and rng.upper.is_finite and rng.upper.is_number and rng.upper < upper:
                    upper = int(rng.upper)
    return upper


@register
class SimplifyMasks(Pass):
    """Turn size-only attention masks into is_causal=True (causal) or no mask (all-visible)."""

    name = "simplify_masks"
    kind = "exact"
    requires = ("attention_sites",)

    def run(self, graph, ctx) -> PassResult:
        candidates = {}
        for node in graph.graph.nodes:
            if node.op != "call_function" or node.target not in ATTENTION:
                continue
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            if isinstance(mask, torch.fx.Node):
                ancestors = shape_only_ancestors(mask)
                if ancestors is not None:
                    candidates.setdefault(mask, (ancestors, []))[1].append(node)
        if not candidates:
            return PassResult(modified=False, notes=["no size-only masks"])
        masks = list(candidates)
        nodes = set().union(*(anc for anc, _ in candidates.values()))
        verdicts = {m: None for m in masks}
        for i, seq in enumerate(_probe_sizes(nodes, _seq_upper(graph))):
            values = _evaluate(graph, nodes, masks, seq)
            for m, v in zip(masks, values):
                kind = _classify(v)
                if i == 0:
                    verdicts[m] = kind
                elif verdicts[m] != kind:
                    verdicts[m] = None
        changed = {"causal": 0, "full": 0}
        for mask, (_, sdpas) in candidates.items():
            kind = verdicts[mask]
            if kind is None:
                continue
            for sdpa in sdpas:
                q, k, v = sdpa.args[:3]
                dropout = sdpa.args[4] if len(sdpa.args) > 4 else sdpa.kwargs.get("dropout_p", 0.0)
                kwargs = {k_: v_ for k_, v_ in sdpa.kwargs.items() if k_ not in ("attn_mask", "dropout_p", "is_causal")}
                sdpa.args = (q, k, v, None, dropout, kind == "causal")
                sdpa.kwargs = kwargs
                changed[kind] += 1
        removed = eliminate_dead_code(graph)
        total = changed["causal"] + changed["full"]
        notes = [f"{changed['causal']} causal, {changed['full']} unmasked, {removed} nodes removed"]
        return PassResult(modified=total > 0, notes=notes)
