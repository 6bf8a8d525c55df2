"""Derive explicit-cache prefill and decode graphs from a captured full-sequence decoder graph.

The captured graph computes `outputs = f(ids)` over a whole sequence. Two graphs come out of it, sharing
its weights (the attributes are the same tensors):

- prefill `(ids, positions, *) -> (*outputs, k_0, v_0, k_1, v_1, ..., [scores_0, scores_1, ...])`: the
  full-sequence forward, returning every attention layer's keys (after RoPE, before any GQA repeat,
  [b, kv_heads, s, d]) and values, and, when a policy scores entries at prefill end, the attention the last
  `window` queries pay each key (`torch.ops.prunus.attention_scores`, [b, kv_heads, s]).
- decode `(ids, positions, k_past_0, v_past_0, ..., [past_lengths_0, ...]) -> (*outputs, k_new_0, v_new_0,
  ..., [probs_0, ...])`: the same layers on the new tokens only; each attention becomes
  `torch.ops.prunus.decode_attention` over the cache plus the new entries, which the graph returns for the
  caller to append (the cache is a plain tensor list that a policy can gather, evict or quantize).
- per-head variants, each a flag of `build_kv_graphs`: `ragged` adds `past_lengths_i` [b, kv_heads] after each
  layer's past (heads holding different numbers of entries, Ada-KV); `key_channels` (ThinK) makes each layer's
  past `k_past_i` [b, kv_heads, n_p, d_kept] (older keys, kept channels only), `k_recent_i` (the window's keys,
  whole), `v_past_i` and `k_channels_i` [b, kv_heads, d_kept], read by
  `torch.ops.prunus.decode_attention_pruned_keys` (`pruned_keys.py`); `head_groups` (per layer, the
  KV heads of each group) gives every group its own past, `k_past_i_j, v_past_i_j`, and one attention per group
  over its query heads, merged back in head order (DuoAttention); `query_window` makes the prefill graph also
  return, per layer, the L2 norm of each query channel over the last `query_window` queries ([b, heads, d]).
- quantized decode (`quant={"bits", "group_size", ...}`, for `kv_quant`): the same, but each layer's past is
  the KIVI-style cache of `prunus.kernels.kv_quant` as eight inputs `(k_q_i, k_scale_i, k_min_i, v_q_i,
  v_scale_i, v_min_i, k_res_i, v_res_i)` (packed codes, their scales and minimums, the full-precision
  residual), read by `torch.ops.prunus.decode_attention_quantized(_scores)` without a dequantized copy.

Positions: the captured graph derives token positions from the sequence length (`arange(seq)` for RoPE
tables and learned position embeddings, `cumsum(ones)` in OPT). Those roots are replaced by the explicit
`positions` input (int64 [t], shared by the batch), so new tokens get their true positions and nothing
position-dependent has to be recomputed over the context. Causal and all-visible masks are removed
by `simplify_masks` before the rewrite; any other mask (sliding windows, padding) makes the rewrite fail
with a `PassError` naming it.

Token dropping (`drop_tokens`, LazyLLM-style): the prefill graph keeps the score -> top-k -> gather points,
so the layers after a point cache the kept tokens only, and it appends, per point, the positions of the tokens
kept there ([b, k], in order) for the cache's bookkeeping (`KVGraphs.stages` names each layer's point). The
decode graph bypasses every point (each gather reads its source again, each kept count is the length again):
new tokens flow through all layers, at their true positions, over whatever the caches hold. A merge (tome)
has no single position per token and is refused.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.fx

from prunus.errors import PassError
from prunus.kernels import decode_attention, kv_quant  # noqa: F401  (registers torch.ops.prunus.decode_attention*)
from prunus.passes.cleanup.dce import eliminate_dead_code
from prunus.passes.kv import pruned_keys  # noqa: F401  (registers torch.ops.prunus.decode_attention_pruned_keys)

aten = torch.ops.aten
PASS = "kv_cache"
# Ops that move data between the site's keys/values and the attention op without changing them per KV head.
_REPEAT_PATH = {aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.expand.default,
                aten.unsqueeze.default, aten.slice.Tensor, aten.repeat.default, aten.repeat_interleave.self_int,
                aten.clone.default, aten.contiguous.default}
_ARANGE = {aten.arange.default, aten.arange.start, aten.arange.start_step}
_CONSTANT_FILLS = {aten.ones.default, aten.full.default, aten.new_ones.default, aten.ones_like.default}


@dataclass
class KVLayer:
    """One attention layer's cache geometry."""
    layer: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_dim: int
    scale: float


@dataclass
class KVGraphs:
    prefill: torch.fx.GraphModule
    decode: torch.fx.GraphModule
    layers: list[KVLayer]
    num_outputs: int  # outputs of the original graph, which come first in both graphs
    prefill_window: int | None = None  # the prefill graph appends scores of this many last queries
    decode_probs: bool = False  # the decode graph appends each layer's attention probabilities
    ragged: bool = False  # the decode graph takes per-head valid lengths of the cache
    quant: dict | None = None  # the decode graph takes quantized caches (bits, group_size)
    query_window: int | None = None  # the prefill graph appends per-channel query norms over this many queries
    key_channels: bool = False  # the decode graph takes each layer's kept key channels
    head_groups: list | None = None  # per layer, the KV heads of each separately cached group
    notes: list = field(default_factory=list)
    # token dropping: per layer, 0 (it caches the whole prompt) or j (the tokens kept at drop point j, whose
    # positions [b, k_j] are the prefill graph's j-th of its `drop_points` last outputs)
    stages: list[int] = field(default_factory=list)
    drop_points: int = 0


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _same_size(a, b) -> bool:
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return not isinstance(a, torch.SymInt) and not isinstance(b, torch.SymInt) and a == b


def _ids_input(graph):
    """The index of the token-ids input and its sequence size (a SymInt)."""
    for i, ph in enumerate(graph.placeholders()):
        val = _val(ph)
        if isinstance(val, torch.Tensor) and val.dim() == 2 and not val.dtype.is_floating_point:
            return i, val.shape[1]
    raise PassError(PASS, "the model has no [batch, seq] integer token-ids input")


def _pre_repeat(node: torch.fx.Node, num_kv_heads: int) -> torch.fx.Node:
    """Walk from an attention operand back over the GQA repeat to the per-KV-head tensor [b, kv, s, d]."""
    cur = node
    while True:
        val = _val(cur)
        if (isinstance(val, torch.Tensor) and val.dim() == 4 and _same_size(val.shape[1], num_kv_heads)
                and not (cur.op == "call_function" and cur.target in (aten.expand.default, aten.slice.Tensor))):
            return cur
        if cur.op != "call_function" or cur.target not in _REPEAT_PATH:
            raise PassError(PASS, "cannot find the per-KV-head keys/values behind the attention's GQA repeat",
                            node=node.name)
        cur = cur.args[0]


def _scale(site) -> float:
    node = site.node
    scale = node.args[6] if len(node.args) > 6 else node.kwargs.get("scale")
    return float(scale) if scale is not None else 1.0 / math.sqrt(site.head_dim)


def _outputs_read(graph) -> set:
    """Nodes the outputs read other than through a drop point's selection (what the scores alone need is left out)."""
    seen, stack = set(), [graph.output_node()]
    while stack:
        n = stack.pop()
        if n not in seen and "prunus_token_keep" not in n.meta:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def attention_layers(graph) -> list:
    """The attention sites a KV cache applies to, in layer order, checked for what the rewrite supports."""
    sites = graph.analysis("attention_sites")
    if any("prunus_token_keep" in n.meta for n in graph.graph.nodes):
        # gemfilter's full-length copies of the first layers only score tokens: they have no cache
        live = _outputs_read(graph)
        sites = [s for s in sites if s.node in live]
    if not sites:
        raise PassError(PASS, "the graph has no attention: there is no KV cache to rewrite")
    for site in sites:
        if site.kind != "sdpa":
            raise PassError(PASS, f"layer {site.layer} computes attention explicitly (matmul-softmax-matmul); "
                                  "the KV rewrite needs scaled_dot_product_attention", node=site.node.name)
        if not site.is_causal:
            what = "a mask that is not plainly causal (sliding window or padding)" if site.mask is not None else \
                "no causal mask: an encoder-only model, whose tokens all see each other, has no KV cache to reuse"
            raise PassError(PASS, f"attention of layer {site.layer} has {what}", node=site.node.name)
        dropout = site.node.args[4] if len(site.node.args) > 4 else site.node.kwargs.get("dropout_p", 0.0)
        if dropout:
            raise PassError(PASS, f"attention of layer {site.layer} applies dropout {dropout}", node=site.node.name)
    return sorted(sites, key=lambda s: s.layer)


def _copy(gm: torch.fx.GraphModule):
    g = torch.fx.Graph()
    env: dict = {}
    out = g.graph_copy(gm.graph, env)
    return g, env, out


def _replace_positions(g: torch.fx.Graph, env: dict, source: torch.fx.Graph, seq, positions) -> int:
    """Point every position root (arange over the sequence, cumsum of ones along it) at `positions`."""
    replaced, known = 0, set(g.nodes)
    for node in source.nodes:
        if node.op != "call_function":
            continue
        val = _val(node)
        if not isinstance(val, torch.Tensor):
            continue
        new = env[node]
        if node.target in _ARANGE and val.dim() == 1 and _same_size(val.shape[0], seq):
            start = node.args[0] if node.target != aten.arange.default else 0
            with g.inserting_before(new.next):
                rep = g.call_function(aten.add.Tensor, (positions, start)) if start else positions
                rep = g.call_function(aten._to_copy.default, (rep,), {"dtype": val.dtype})
        elif (node.target == aten.cumsum.default and val.dim() >= 1 and _same_size(val.shape[-1], seq)
              and node.args[1] in (-1, val.dim() - 1) and isinstance(node.args[0], torch.fx.Node)
              and node.args[0].target in _CONSTANT_FILLS and _fill_value(node.args[0]) == 1):
            # cumsum of ones along the tokens is position + 1 (OPT's learned positions)
            with g.inserting_before(new.next):
                plus = g.call_function(aten.add.Tensor, (positions, 1))
                rep = g.call_function(aten.mul.Tensor, (env[node.args[0]], plus))
                rep = g.call_function(aten._to_copy.default, (rep,), {"dtype": val.dtype})
        else:
            continue
        created = {n for n in rep.graph.nodes if n.op == "call_function" and n not in known}
        new.replace_all_uses_with(rep, delete_user_cb=lambda user: user not in created)
        known |= created
        replaced += 1
    return replaced


def _fill_value(node):
    if node.target in (aten.ones.default, aten.new_ones.default, aten.ones_like.default):
        return 1
    return node.args[1] if len(node.args) > 1 else None


def _placeholder(g, after, name, val=None):
    with g.inserting_after(after):
        ph = g.placeholder(name)
    if val is not None:
        ph.meta["val"] = val
    return ph


def _finish(graph, g: torch.fx.Graph, outputs) -> torch.fx.GraphModule:
    g.output(tuple(outputs))
    eliminate_dead_code(SimpleNamespace(graph=g))
    g.lint()
    return torch.fx.GraphModule(graph.gm, g)


_QUANTIZED_INPUTS = ("k_q", "k_scale", "k_min", "v_q", "v_scale", "v_min", "k_res", "v_res")


def _runs(heads: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs [start, stop) of sorted head indices."""
    runs: list[list[int]] = []
    for h in heads:
        if runs and runs[-1][1] == h:
            runs[-1][1] = h + 1
        else:
            runs.append([h, h + 1])
    return [tuple(r) for r in runs]


def _cat_heads(g, parts):
    return parts[0] if len(parts) == 1 else g.call_function(aten.cat.default, (parts, 1))


def _select_heads(g, x, heads: list[int], per: int):
    """The rows of KV heads `heads` (each `per` rows along dim 1) of x."""
    return _cat_heads(g, [g.call_function(aten.slice.Tensor, (x, 1, a * per, b * per)) for a, b in _runs(heads)])


def _merge_heads(g, outs: list, groups: list[list[int]], per: int):
    """Per-group outputs (rows of their heads, in order) back into one tensor in KV-head order."""
    owner = {h: (j, i) for j, heads in enumerate(groups) for i, h in enumerate(heads)}
    parts, h = [], 0
    while h < len(owner):
        j, i = owner[h]
        stop = h + 1
        while stop < len(owner) and owner[stop] == (j, i + stop - h):
            stop += 1
        parts.append(g.call_function(aten.slice.Tensor, (outs[j], 1, i * per, (i + stop - h) * per)))
        h = stop
    return _cat_heads(g, parts)


def _topk_count(idx: torch.fx.Node):
    """The kept count (`k` of the top-k) behind a drop point's sorted indices, or None if they are not a top-k."""
    sort = idx.args[0] if idx.target is operator.getitem else None
    top = sort.args[0] if sort is not None and sort.target == aten.sort.default else None
    topk = top.args[0] if top is not None and top.target is operator.getitem else None
    return topk.args[1] if topk is not None and topk.target == aten.topk.default else None


def token_drops(graph) -> list[tuple[torch.fx.Node, object]]:
    """`drop_tokens`' points in graph order: (indices [b, k] kept within the stream there, the kept count)."""
    drops = []
    for node in graph.graph.nodes:
        if "prunus_token_keep" not in node.meta:
            continue
        count = _topk_count(node)
        if count is None:
            raise PassError(PASS, "token merging (tome) cannot be decoded: a merged token stands for several "
                                  "positions and has no single cache entry; use a dropping method", node=node.name)
        if not isinstance(count, torch.fx.Node):
            raise PassError(PASS, "token dropping over a fixed token count cannot be decoded: a decode step has "
                                  "another length", node=node.name)
        drops.append((node, count))
    return drops


def _layer_stages(pre, drops, seq) -> list[int]:
    """Per layer, 0 if its keys span the whole sequence, else the (1-based) drop point whose tokens they hold."""
    stages = []
    for _, k, _ in pre:
        n = _val(k).shape[2]
        found = [j + 1 for j, (idx, _) in enumerate(drops) if _same_size(n, _val(idx).shape[1])]
        if not _same_size(n, seq) and not found:
            raise PassError(PASS, f"keys of shape {tuple(_val(k).shape)} span neither the sequence nor the tokens "
                                  "of a drop point", node=k.name)
        stages.append(0 if _same_size(n, seq) else found[-1])
    return stages


def _kept_positions(g, env, drops, ids, positions) -> list:
    """Prefill: per drop point, the positions [b, k] of the tokens kept there (each point indexes the last)."""
    b = g.call_function(aten.sym_size.int, (ids, 0))
    pos = g.call_function(aten.expand.default, (g.call_function(aten.unsqueeze.default, (positions, 0)), [b, -1]))
    kept = []
    for idx, _ in drops:
        pos = g.call_function(aten.gather.default, (pos, 1, env[idx]))
        kept.append(pos)
    return kept


_INDEX_PATH = {aten.view.default, aten.expand.default, aten.unsqueeze.default, aten.reshape.default}


def _bypass_drops(graph, g, env, drops) -> None:
    """Decode: every gather indexed by a drop point reads its (un-expanded) source, every kept count is the
    length it was taken from; the scoring and selection nodes are left dead."""
    points = {idx for idx, _ in drops}

    def dropped(node):
        if node.op != "call_function" or node.target != aten.gather.default:
            return False
        index = node.args[2]
        while index not in points and index.op == "call_function" and index.target in _INDEX_PATH:
            index = index.args[0]
        return index in points

    gathers = [n for n in graph.graph.nodes if dropped(n)]
    for node in gathers:
        src = node
        while src in gathers or (src.target == aten.expand.default and "prunus_tokens" in src.meta):
            src = src.args[0]
        env[node].replace_all_uses_with(env[src])
    for idx, count in drops:
        if count.target is operator.sub:  # kept_count: length - floor((1 - keep) * length)
            env[count].replace_all_uses_with(env[count.args[0]])
        elif count.target != aten.sym_size.int:  # keep 1: the count is the length itself
            raise PassError(PASS, "cannot find the token count a drop point's kept count was taken from",
                            node=count.name)


def _check_bypassed(decode: torch.fx.GraphModule) -> None:
    left = [n.name for n in decode.graph.nodes if "prunus_tokens" in n.meta and n.target != aten.sym_size.int]
    if left:
        raise PassError(PASS, f"the decode graph still runs token-dropping nodes ({', '.join(left[:4])}); this "
                              "drop method cannot be decoded")


def build_kv_graphs(graph, *, prefill_window: int | None = None, decode_probs: bool = False,
                    ragged: bool = False, quant: dict | None = None, query_window: int | None = None,
                    key_channels: bool = False, head_groups: list | None = None) -> KVGraphs:
    """The prefill and decode graphs of `graph` (see the module docstring)."""
    if quant is not None and (ragged or key_channels or head_groups):
        raise PassError(PASS, "a quantized cache is rectangular and full width: it cannot hold per-head lengths, "
                              "pruned key channels or per-group caches (adakv, think, duo); drop kv_quant or choose "
                              "a uniform policy")
    if head_groups is not None and (decode_probs or ragged):
        raise PassError(PASS, "per-group caches return no attention probabilities and take no per-head lengths")
    sites = attention_layers(graph)
    ids_index, seq = _ids_input(graph)
    if len(graph.placeholders()) != 1:
        raise PassError(PASS, "the KV graphs take token ids only; capture the model with input ids as its one input "
                              f"(it has {len(graph.placeholders())} tensor inputs)")
    layers, pre = [], []
    for site in sites:
        sdpa = site.node
        k = _pre_repeat(sdpa.args[1], site.num_kv_heads)
        v = _pre_repeat(sdpa.args[2], site.num_kv_heads)
        kval, vval = _val(k), _val(v)
        layers.append(KVLayer(site.layer, site.num_heads, site.num_kv_heads, int(kval.shape[-1]),
                              int(vval.shape[-1]), _scale(site)))
        pre.append((sdpa, k, v))
    drops = token_drops(graph)
    stages = _layer_stages(pre, drops, seq)

    def common():
        g, env, out = _copy(graph.gm)
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        last = env[graph.placeholders()[-1]]
        positions = _placeholder(g, last, "positions")
        if not _replace_positions(g, env, graph.graph, seq, positions):
            raise PassError(PASS, "found no position source (arange over the sequence) in the graph")
        return g, env, out, positions

    # prefill
    g, env, out, positions = common()
    extra, scores, norms = [], [], []
    for (sdpa, k, v), layer in zip(pre, layers):
        extra += [env[k], env[v]]
        if prefill_window is not None:
            with g.inserting_after(env[sdpa]):
                scores.append(g.call_function(torch.ops.prunus.attention_scores.default,
                                              (env[sdpa.args[0]], env[k], prefill_window, layer.scale)))
        if query_window is not None:
            with g.inserting_after(env[sdpa]):
                last = g.call_function(aten.slice.Tensor, (env[sdpa.args[0]], 2, -query_window, 2 ** 63 - 1))
                with g.inserting_after(last):
                    norms.append(g.call_function(aten.linalg_vector_norm.default, (last, 2, [2])))
    kept = _kept_positions(g, env, drops, env[graph.placeholders()[ids_index]], positions) if drops else []
    prefill = _finish(graph, g, out + extra + scores + norms + kept)

    # decode
    g, env, out, positions = common()
    _bypass_drops(graph, g, env, drops)
    after, extra, probs = positions, [], []
    for i, ((sdpa, k, v), layer) in enumerate(zip(pre, layers)):
        new, q, k_new, v_new = env[sdpa], env[sdpa.args[0]], env[k], env[v]
        per = layer.num_heads // layer.num_kv_heads
        groups = [h for h in head_groups[i] if h] if head_groups is not None else None
        if quant is not None:
            past = []
            for name in _QUANTIZED_INPUTS:
                past.append(after := _placeholder(g, after, f"{name}_{i}"))
            calls = [(q, *past, k_new, v_new, layer.scale, quant["bits"], quant["group_size"])]
            ops = (torch.ops.prunus.decode_attention_quantized_scores.default,
                   torch.ops.prunus.decode_attention_quantized.default)
        elif groups is not None and len(groups) > 1:
            calls = []
            for j, heads in enumerate(groups):
                kp = after = _placeholder(g, after, f"k_past_{i}_{j}")
                vp = after = _placeholder(g, after, f"v_past_{i}_{j}")
                with g.inserting_before(new):
                    calls.append((_select_heads(g, q, heads, per), kp, vp, _select_heads(g, k_new, heads, 1),
                                  _select_heads(g, v_new, heads, 1), layer.scale, None))
            ops = (None, torch.ops.prunus.decode_attention.default)
        else:
            kp = after = _placeholder(g, after, f"k_past_{i}" if groups is None else f"k_past_{i}_0")
            if key_channels:
                recent = after = _placeholder(g, after, f"k_recent_{i}")
            vp = after = _placeholder(g, after, f"v_past_{i}" if groups is None else f"v_past_{i}_0")
            lengths = None
            if ragged:
                lengths = after = _placeholder(g, after, f"past_lengths_{i}")
            if key_channels:
                channels = after = _placeholder(g, after, f"k_channels_{i}")
                calls = [(q, channels, kp, recent, vp, k_new, v_new, layer.scale)]
                ops = (torch.ops.prunus.decode_attention_pruned_keys.default, None)  # (out, probs) only
            else:
                calls = [(q, kp, vp, k_new, v_new, layer.scale, lengths)]
                ops = (torch.ops.prunus.decode_attention_scores.default, torch.ops.prunus.decode_attention.default)
        with g.inserting_before(new):
            if decode_probs or ops[1] is None:
                both = g.call_function(ops[0], calls[0])
                att = g.call_function(operator.getitem, (both, 0))
                if decode_probs:
                    probs.append(g.call_function(operator.getitem, (both, 1)))
            else:
                outs = [g.call_function(ops[1], args) for args in calls]
                att = outs[0] if len(outs) == 1 else _merge_heads(g, outs, groups, per)
        new.replace_all_uses_with(att)
        g.erase_node(new)
        extra += [k_new, v_new]
    decode = _finish(graph, g, out + extra + probs)
    _check_bypassed(decode)
    return KVGraphs(prefill, decode, layers, len(out), prefill_window, decode_probs, ragged, quant, query_window,
                    key_channels, head_groups, stages=stages, drop_points=len(drops))


