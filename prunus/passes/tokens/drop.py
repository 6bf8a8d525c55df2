"""`drop_tokens`: score -> select -> gather points inserted into the forward pass (prefill and encoders).

After layer L (or at each (layer, keep) of a progressive `schedule`) the tokens are scored, the top
`keep` fraction of the original count is kept (sink tokens and the last `protect_last` always), and the
remaining layers run on the kept tokens only, in their original order. Outputs indexed by token hold only
the kept tokens (DESIGN.md's contract); the last position always survives.

Methods (ALGORITHMS.md section 2): `attention` (FastV, Chen et al. 2024; LazyLLM, Fu et al. 2024: the
attention the last queries pay, or CLS / all queries in encoders), `cascade` (SpAtten, Wang et al. 2021:
attention accumulated over every layer so far, pruned tokens stay pruned), `gemfilter` (Shi et al. 2024:
select with layer r's last-query attention, then run the whole model on the selection), `zerotprune`
(weighted PageRank of the attention graph), `tome` (Bolya et al. 2023: bipartite soft matching merges,
size-weighted, with proportional attention), `ttv` (TransPrune's token transition variation).
Each index node is marked `meta["prunus_token_keep"] = {"layer": L}` for the KV-cache rewrite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from prunus.errors import PassError, SpecError
from prunus.ir.analyses.sequence_flow import size_expr
from prunus.passes.base import LossyParams, Pass, PassResult, param
from prunus.passes.cleanup.simplify_masks import SimplifyMasks
from prunus.passes.registry import register
from prunus.passes.tokens import graph_edit as ge
from prunus.passes.tokens import merge, scores

aten = torch.ops.aten
METHODS = ("attention", "cascade", "gemfilter", "zerotprune", "tome", "ttv")


@dataclass(kw_only=True)
class DropTokensParams(LossyParams):
    method: str = param("attention", "how tokens are scored (or merged)", choices=METHODS)
    keep: float = param(0.5, "fraction of the original tokens kept", range="(0, 1]")
    after_layer: int = param(2, "tokens are dropped after this many layers (gemfilter: the selection layer)",
                             range="[1, inf)")
    schedule: list = param([], "progressive dropping: [[layer, keep], ...], layers increasing, keep decreasing")
    sink: int = param(4, "the first tokens, always kept (attention sinks; CLS)", range="[0, inf)")
    protect_last: int = param(1, "the last tokens, always kept (at least the last one)", range="[1, inf)")
    window: int = param(8, "decoders: how many last queries score the tokens", range="[1, inf)")
    queries: str = param("auto", "which queries' attention scores tokens; auto: last (decoders), first (encoders)",
                         choices=("auto", "last", "first", "all"))

    def check(self) -> str | None:
        if not self.schedule:
            return None
        pairs = self.schedule
        if any(not isinstance(p, (list, tuple)) or len(p) != 2 or isinstance(p[0], bool) or not isinstance(p[0], int)
               or not isinstance(p[1], (int, float)) for p in pairs):
            return "schedule must be a list of [layer, keep] pairs"
        layers, keeps = [p[0] for p in pairs], [float(p[1]) for p in pairs]
        if any(layer < 1 for layer in layers) or any(not 0 < k <= 1 for k in keeps):
            return "schedule layers must be >= 1 and keeps in (0, 1]"
        if layers != sorted(set(layers)) or keeps != sorted(keeps, reverse=True):
            return "schedule layers must increase and keeps must not increase"
        if self.method in ("gemfilter", "tome") and len(pairs) > 1:
            return f"method {self.method} takes one point: give after_layer and keep, or a one-entry schedule"
        return None

    def points(self) -> list[tuple[int, float]]:
        return [(int(p[0]), float(p[1])) for p in self.schedule] or [(self.after_layer, self.keep)]


def _layer_spans(graph) -> dict:
    """layer index -> (entry of its first block, exit of its last block)."""
    spans: dict = {}
    for blk in graph.analysis("blocks"):
        entry, _ = spans.get(blk.layer, (blk.entry, None))
        spans[blk.layer] = (entry, blk.exit)
    return dict(sorted(spans.items()))


_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default,
             aten._to_copy.default, aten.clone.default, aten.contiguous.default}


def _stream(graph, node: torch.fx.Node, pass_name: str) -> torch.fx.Node:
    """The residual stream at `node` in its [batch, tokens, hidden] form: OPT adds residuals on a flattened
    [batch * tokens, hidden] view and reshapes back after the layer, so follow such reshapes forward."""
    flow = graph.analysis("sequence_flow")
    start = node
    while True:
        shape = node.meta["val"].shape
        if len(shape) == 3 and size_expr(shape[0]) == flow.batch:
            return node
        nexts = [u for u in node.users if u.op == "call_function" and u.target in _RESHAPES]
        if len(nexts) != 1:
            raise PassError(pass_name, f"the residual stream {tuple(shape)} after this layer has no [batch, tokens, "
                                       "hidden] form to drop tokens from", node=start.name)
        node = nexts[0]


def _evaluate(graph, node: torch.fx.Node) -> torch.Tensor:
    """The value of `node` on the graph's example inputs (only its ancestors run)."""
    needed = ge.ancestors([node], set(graph.graph.nodes))
    sub, env = torch.fx.Graph(), {}
    for n in graph.graph.nodes:
        if n in needed:
            env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(env[node])
    inputs = [x for ph, x in zip(graph.placeholders(), graph.example_inputs) if ph in needed]
    with torch.no_grad():
        return torch.fx.GraphModule(graph.gm, sub)(*inputs)


def is_causal(graph, site) -> bool:
    """Whether the site's attention is causal: its flag, or a mask hiding the second key from the first query."""
    if site.kind == "sdpa":
        ops = scores.sdpa_operands(site.node)
        mask = ops["mask"]
        if ops["is_causal"]:
            return True
    else:
        mask = site.mask
    if not isinstance(mask, torch.fx.Node):
        return False
    value = _evaluate(graph, mask)
    if value.shape[-1] < 2 or value.shape[-2] < 2:
        return False
    first_row = value[..., 0, 1]
    hidden = ~first_row if value.dtype == torch.bool else first_row < -1e4
    return bool(hidden.all())


@register
class DropTokens(Pass):
    """Drop (or merge) tokens inside the forward pass: score, keep the top fraction, run later layers on them."""

    name = "drop_tokens"
    kind = "lossy"
    Params = DropTokensParams
    requires = ("attention_sites", "blocks", "sequence_flow")

    def run(self, graph, ctx) -> PassResult:
        p = self.params
        if not graph.analysis("attention_sites"):
            raise PassError(self.name, "the graph has no attention sites; token dropping scores and drops tokens "
                                       "of transformer layers")
        depth = len(_layer_spans(graph))
        points = p.points()
        for layer, _ in points:
            if layer > depth:
                raise SpecError(f"layer {layer} is beyond the model's depth ({depth} layers)", pass_name=self.name,
                                key="schedule" if p.schedule else "after_layer", accepted=f"1..{depth}")
        first_site = next(s for s in graph.analysis("attention_sites"))
        causal = is_causal(graph, first_site)
        queries = p.queries if p.queries != "auto" else ("last" if causal else "first")
        if p.method == "tome" and causal:
            raise PassError(self.name, "tome merges tokens of bidirectional encoders; this model's attention is "
                                       "causal (use attention, cascade, gemfilter or ttv)", node=first_site.node.name)
        if causal and SimplifyMasks().run(graph, ctx).modified:
            # a size-only causal mask becomes SDPA's flag, which stays right over the kept tokens (they keep their
            # order), instead of a mask gathered per point (the KV-cache rewrite needs the flag)
            graph.invalidate()
            graph.recompile(self.name)
        notes, carry, previous = [], None, 1.0
        for layer, keep in points:
            graph.invalidate()
            carry, note = self._insert_point(graph, layer, keep / previous, keep, queries, carry)
            notes.append(note)
            previous = keep
            ge.toposort(graph)
            graph.recompile(self.name)
        graph.invalidate()
        return PassResult(modified=True, notes=notes)

    def _insert_point(self, graph, layer: int, ratio: float, keep: float, queries: str, carry):
        """Insert one point after `layer` layers keeping `ratio` of the tokens present there."""
        p = self.params
        spans = _layer_spans(graph)
        sites = {s.layer: s for s in graph.analysis("attention_sites")}
        indices = list(spans)
        scored = indices[layer - 1]
        if scored not in sites:
            raise PassError(self.name, f"layer {scored} has no attention site to score tokens with")
        point = _stream(graph, spans[indices[0]][0] if p.method == "gemfilter" else spans[scored][1], self.name)
        region = (ge.descendants(point) - {point}) | {graph.output_node()}
        em = ge.Emitter(graph, point.meta["val"].device, tag={"layer": layer})
        length = em.size(point, 1)
        batch = graph.analysis("sequence_flow").batch
        if p.method == "tome":
            new_stream, idx, sizes, k = merge.tome(em, point, sites[scored], length, ratio, p.sink, self.name)
            idx.meta["prunus_token_keep"] = {"layer": layer}
            gathered = ge.rewire(graph, em, point, new_stream, idx, k, region, self.name)
            merge.proportional_attention(em, region, sizes, self.name)
            return None, f"after layer {layer}: merged to {keep:g} of the tokens (tome), {gathered} side tensors"
        score = self._score(graph, em, layer, scored, sites, spans, point, region, queries, length)
        if p.method == "cascade":
            score = score if carry is None else em(aten.add.Tensor, score, carry)
        k = ge.kept_count(em, length, ratio)
        idx = ge.select(em, ge.priority(em, score, length, p.sink, p.protect_last), k)
        idx.meta["prunus_token_keep"] = {"layer": layer}
        new_stream = ge.gather(em, point, idx, (1,), batch, self.name)
        gathered = ge.rewire(graph, em, point, new_stream, idx, k, region, self.name)
        carry = em(aten.gather.default, score, 1, idx) if p.method == "cascade" else None
        where = "before layer 0 (selected at layer " + str(scored) + ")" if p.method == "gemfilter" \
            else f"after layer {layer}"
        return carry, f"{where}: kept {keep:g} of the tokens ({p.method}), {gathered} side tensors gathered"

    def _score(self, graph, em, layer, scored, sites, spans, point, region, queries, length):
        p = self.params
        if p.method == "attention":
            return scores.received_attention(em, sites[scored], queries, p.window, length)
        if p.method == "cascade":
            layers = [i for i in spans if i <= scored and i in sites and sites[i].node not in _done(graph)]
            total = None
            for i in layers:
                s = scores.received_attention(em, sites[i], queries, p.window, em.size(sites[i].node, 2))
                total = s if total is None else em(aten.add.Tensor, total, s)
                sites[i].node.meta["prunus_tokens_scored"] = True
            return total
        if p.method == "zerotprune":
            return scores.pagerank(em, sites[scored], length)
        if p.method == "ttv":
            entry, exit_ = spans[scored]
            return scores.transition(em, entry, exit_)
        # gemfilter: score with a full-length copy of the layers up to the selection layer's q and k
        site = sites[scored]
        ops = scores.sdpa_operands(site.node) if site.kind == "sdpa" else None
        targets = [ops["q"], ops["k"]] if ops else [site.node]
        copy_set = ge.ancestors(targets, region)
        env = {}
        with graph.graph.inserting_before(graph.output_node()):
            for n in graph.graph.nodes:
                if n in copy_set:
                    env[n] = graph.graph.node_copy(n, lambda a: env.get(a, a))
                    em.created.add(env[n])
        shadow = _Shadow(site, env)
        return scores.received_attention(em, shadow, "last" if queries == "auto" else queries, p.window, length)


def _done(graph) -> set:
    """SDPA nodes whose attention an earlier cascade point already counted."""
    return {n for n in graph.graph.nodes if n.meta.get("prunus_tokens_scored")}


class _Shadow:
    """A site seen through a node copy map: its SDPA with q and k replaced by their full-length copies."""

    def __init__(self, site, env: dict):
        self.kind = site.kind
        node = site.node
        self.node = _Copied(node, env)


class _Copied:
    def __init__(self, node: torch.fx.Node, env: dict):
        remap = lambda a: env.get(a, a) if isinstance(a, torch.fx.Node) else a  # noqa: E731
        self.args = tuple(torch.utils._pytree.tree_map(remap, node.args))
        self.kwargs = dict(torch.utils._pytree.tree_map(remap, node.kwargs))
        self.name = node.name
        self.meta = node.meta
