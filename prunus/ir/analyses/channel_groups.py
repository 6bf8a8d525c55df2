"""Channel groups: which weight rows and columns must be removed together (DepGraph; "Structurally Prune
Anything", SPA).

A group is a set of prunable *units* (MLP neurons, attention heads / GQA KV groups, query heads inside KV
groups, or channels of the hidden dimension) shared by producers
(matmuls whose output channels hold the units, with their biases) and consumers (matmuls whose input
channels read them). Groups are found by walking the graph forward from the producers and tracking, for
every node on the way, which tensor axis carries the units: through pointwise ops (act, gate * up, RoPE,
dropout, casts), views, transposes, the GQA expand/reshape and attention itself. Every tracked axis has
size `units x width`, so after keeping `k` of `n` units each shape literal on that axis (in view, reshape,
expand, split) scales to `old // n * k`; `literals` lists them so the pruning machinery rewrites them
instead of patching by hand, and shape re-propagation checks the result.

The hidden dimension is one group spanning the whole residual stream: embeddings and every projection that
writes into a residual add produce it, norm weights and biases scale it elementwise, every projection reading
a (normalized) hidden state consumes it, and the reductions of RMS/LayerNorm-style norms run over it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx

from prunus.ir.graph import common_module_path, layer_index, module_path
from prunus.ir.ops import ATTENTION, SOFTMAX, weight_of

aten = torch.ops.aten

_CASTS = {aten.dropout.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.contiguous.default,
          aten.alias.default, aten.type_as.default, aten.clone.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int}
_BATCHED_MATMUL = {aten.matmul.default, aten.bmm.default}


@dataclass(eq=False)
class Member:
    """One weight of a group: units lie along `dim` of `weight`; `index[u]` lists unit u's channels."""

    node: torch.fx.Node  # the matmul
    weight: torch.fx.Node  # its get_attr
    dim: int
    index: torch.Tensor  # [units, channels per unit]
    bias: torch.fx.Node | None = None  # producers: the bias sliced with the same channels; consumers: output bias


@dataclass(eq=False)
class ChannelGroup:
    kind: str  # "mlp", "heads", "query_heads" or "hidden"
    layer: int
    module: str
    units: int  # neurons, or heads (KV groups under GQA)
    producers: list[Member]
    consumers: list[Member]
    literals: list = field(default_factory=list, repr=False)  # (node, arg position, list position or None)
    heads_per_unit: int = 1  # query heads one allocated unit stands for (heads: n_rep; query_heads: the KV groups)
    site: object = field(default=None, repr=False)  # the AttentionSite of a heads group
    elementwise: list = field(default_factory=list)  # hidden: norm weights/biases, units along `dim`
    reductions: list = field(default_factory=list, repr=False)  # hidden: mean nodes over the unit axis
    per_kv_group: int = 1  # query_heads: units split into this many KV groups, each keeping as many

    @property
    def members(self) -> list[Member]:
        return self.producers + self.consumers


@dataclass
class ChannelGroups:
    mlp: list[ChannelGroup]
    heads: list[ChannelGroup]
    unsupported: list[tuple[str, str, str]]  # (kind, node, reason) of groups that cannot be pruned
    hidden: list[ChannelGroup] = field(default_factory=list)  # at most one: the residual stream's width
    # why the hidden width cannot be pruned; apart from `unsupported` because an encoder returning its hidden
    # states (which no pass may reshape) is a normal model, not a gap in the analysis
    hidden_unsupported: list[tuple[str, str, str]] = field(default_factory=list)
    query_heads: list[ChannelGroup] = field(default_factory=list)  # GQA: query heads inside KV groups


class Untrackable(Exception):
    """The unit axis reaches an op the walk cannot follow; carries the node and the reason."""

    def __init__(self, node: torch.fx.Node, reason: str):
        self.node, self.reason = node, reason
        super().__init__(f"{node.name}: {reason}")


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _shape(node) -> list:
    val = _val(node)
    return [sympy.sympify(s.node.expr if isinstance(s, torch.SymInt) else int(s)) for s in val.shape]


def _prod(sizes) -> sympy.Expr:
    out = sympy.Integer(1)
    for s in sizes:
        out = out * s
    return sympy.expand(out)


def activation_arg(node: torch.fx.Node) -> int:
    """Which arg of a linear/addmm is the activation (addmm(bias, x, W) reads x second)."""
    return 1 if node.target == aten.addmm.default else 0


def _weight_dims(graph, node: torch.fx.Node):
    """(weight get_attr, out dim, in dim, bias get_attr or None) of a linear/addmm whose weight is a direct arg."""
    w = weight_of(graph, node)
    if node.target == aten.linear.default and node.args[1] is w:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return w, 0, 1, bias
    if node.target == aten.addmm.default and node.args[2] is w:
        return w, 1, 0, node.args[0]
    return None


def _view_axis(node, in_shape, out_shape, axis, units) -> int:
    """The output axis holding the units after a view, or Untrackable when the units would be split up."""
    before, size = _prod(in_shape[:axis]), in_shape[axis]
    j = next((j for j in range(len(out_shape) + 1) if sympy.expand(_prod(out_shape[:j]) - before) == 0), None)
    if j is None or j == len(out_shape):
        raise Untrackable(node, "a view mixes the pruned axis with the dims before it")
    if sympy.expand(out_shape[j] - size) == 0:
        return j
    width = size / units
    k2 = next((k for k in range(j + 1, len(out_shape) + 1) if sympy.expand(_prod(out_shape[j:k]) - size) == 0), None)
    if k2 is not None:  # split of the unit axis: the units must stay whole blocks of one sub-axis
        for m in range(j, k2):
            tail = _prod(out_shape[m + 1:k2])
            if all(s == 1 for s in out_shape[j:m]) and (width / tail).is_integer:
                return m
        raise Untrackable(node, "a view splits pruned units across several axes")
    i2 = next((i for i in range(axis + 1, len(in_shape) + 1)
               if sympy.expand(_prod(in_shape[axis:i]) - out_shape[j]) == 0), None)
    if i2 is None:
        raise Untrackable(node, "a view reshapes the pruned axis in an unsupported way")
    return j  # merge with the following axes: units stay contiguous blocks


class _Walk:
    """Forward walk from producer outputs; `axis[node]` is the unit axis of each node on the path."""

    def __init__(self, graph, units: int):
        self.graph, self.units = graph, units
        self.axis: dict = {}
        self.segmented: set = set()  # fused-projection outputs before their split
        self.consumers: list = []
        self.literals: list = []

    def run(self, starts: dict, segmented=()) -> None:
        self.segmented = set(segmented)
        queue = list(starts.items())
        while queue:
            node, ax = queue.pop(0)
            if node in self.axis:
                if self.axis[node] != ax:
                    raise Untrackable(node, "reached along two different axes")
                continue
            self.axis[node] = ax
            for user in list(node.users):
                nxt = self._step(node, user, ax)
                if nxt is not None:
                    queue.extend(nxt)
        self._check_operands()

    def _step(self, src, node, ax):
        """The (node, axis) pairs the units reach through `node` from input `src`."""
        t = node.target
        if node.op == "output":
            raise Untrackable(src, "pruned channels reach a graph output")
        rank = len(_val(node).shape) if isinstance(_val(node), torch.Tensor) else None
        if weight_of(self.graph, node) is not None and node.args[activation_arg(node)] is src:
            dims = _weight_dims(self.graph, node)
            if dims is None or ax != len(_val(src).shape) - 1:
                raise Untrackable(node, "consumer reads the pruned channels on an axis other than its input dim")
            if src in self.segmented:
                raise Untrackable(node, "a fused projection's output is consumed before its split")
            self.consumers.append(node)
            return None
        if t == aten._assert_tensor_metadata.default:  # a dtype check (eager attention's casts): no tensor out
            if node.kwargs.get("size") is not None or (len(node.args) > 1 and node.args[1] is not None):
                raise Untrackable(node, "a metadata assert fixes the pruned axis's size")
            return None
        segmented = src in self.segmented
        if t in _CASTS or (isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags):
            if segmented:
                self.segmented.add(node)
            return [(node, ax + rank - len(_val(src).shape))]
        if t in _VIEWS:
            out = _view_axis(node, _shape(src), _shape(node), ax, self.units)
            if segmented:
                if sympy.expand(_shape(node)[out] - _shape(src)[ax]) != 0:
                    raise Untrackable(node, "a view reshapes a fused projection before its split")
                self.segmented.add(node)
            self._literal(node, 1, out)
            return [(node, out)]
        if segmented and t not in _SPLITS:
            raise Untrackable(node, "a fused projection's output reaches an op other than its split")
        if t == aten.expand.default:
            out = ax + len(node.args[1]) - len(_val(src).shape)
            self._literal(node, 1, out)
            return [(node, out)]
        if t in (aten.transpose.int, aten.t.default):
            d0, d1 = (node.args[1] % rank, node.args[2] % rank) if t == aten.transpose.int else (0, 1)
            return [(node, d1 if ax == d0 else d0 if ax == d1 else ax)]
        if t == aten.permute.default:
            return [(node, [d % rank for d in node.args[1]].index(ax))]
        if t == aten.unsqueeze.default:
            return [(node, ax + (1 if node.args[1] % rank <= ax else 0))]
        if t in (aten.squeeze.dim, aten.squeeze.dims, aten.select.int):
            in_rank = len(_val(src).shape)
            dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
            dims = [d % in_rank for d in dims]
            if ax in dims:
                raise Untrackable(node, "removes the pruned axis")
            return [(node, ax - sum(d < ax for d in dims))]
        if t == aten.slice.Tensor:
            dim = node.args[1] % rank
            if dim == ax and sympy.expand(_shape(node)[ax] - _shape(src)[ax]) != 0:
                raise Untrackable(node, "slices the pruned axis")
            return [(node, ax)]
        if t == aten.cat.default:
            dim = (node.args[1] if len(node.args) > 1 else 0) % rank
            if dim == ax:
                raise Untrackable(node, "concatenates along the pruned axis")
            return [(node, ax)]
        if t == aten.repeat_interleave.self_int:
            return [(node, ax)]
        if t in SOFTMAX:
            if node.args[1] % rank == ax:
                raise Untrackable(node, "normalizes over the pruned axis")
            return [(node, ax)]
        if t in ATTENTION:
            if ax != len(_val(src).shape) - 3 or src not in node.args[:3]:
                raise Untrackable(node, "the pruned axis of an attention input is not its head axis")
            mask = _val(node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask"))
            if isinstance(mask, torch.Tensor) and mask.dim() >= 3 and mask.shape[-3] != 1:
                raise Untrackable(node, "the attention mask differs per head")
            return [(node, ax)]
        if t in _BATCHED_MATMUL and weight_of(self.graph, node) is None:
            if ax >= len(_val(src).shape) - 2:
                raise Untrackable(node, "an activation matmul contracts the pruned axis")
            return [(node, ax + rank - len(_val(src).shape))]
        if t in _SPLITS:
            dim = (node.args[2] if t != aten.unbind.int and len(node.args) > 2 else
                   node.args[1] if t == aten.unbind.int and len(node.args) > 1 else 0)
            dim = dim % len(_val(src).shape)
            if dim == ax and not segmented:
                raise Untrackable(node, "splits the pruned axis")
            if dim == ax:
                if t not in (aten.split.Tensor, aten.split_with_sizes.default):
                    raise Untrackable(node, "a fused projection is split by an op other than split")
                self._literal(node, 1, None if t == aten.split.Tensor else "all")
            out = ax if t != aten.unbind.int else ax - (dim < ax)
            return [(u, out) for u in node.users]
        raise Untrackable(node, f"the pruned axis reaches {t}, which the walk does not follow")

    def _literal(self, node, arg: int, pos) -> None:
        value = node.args[arg]
        if pos == "all" or pos is None or (isinstance(value[pos], int) and value[pos] != -1):
            self.literals.append((node, arg, pos))
        elif not isinstance(value[pos], int):
            raise Untrackable(node, "the pruned axis has a symbolic size in a shape argument")

    def _check_operands(self) -> None:
        """Every other operand of a pointwise op must broadcast along the unit axis (size 1 or absent)."""
        for node, ax in self.axis.items():
            if node.op != "call_function" or not (isinstance(node.target, torch._ops.OpOverload)
                                                  and torch.Tag.pointwise in node.target.tags):
                continue
            rank = len(_val(node).shape)
            for a in node.all_input_nodes:
                val = _val(a)
                if a in self.axis or not isinstance(val, torch.Tensor):
                    continue
                pos = ax - (rank - val.dim())
                if pos >= 0 and val.shape[pos] != 1:
                    raise Untrackable(node, f"operand '{a.name}' varies along the pruned axis")


def _layer_of(node: torch.fx.Node, default: int) -> int:
    idx = layer_index(module_path(node))
    return idx if idx is not None else default


def _back_to_producers(graph, consumer: torch.fx.Node) -> set | None:
    """Weighted matmuls feeding `consumer`'s input through pointwise ops and views; None if anything else does."""
    producers, seen = set(), set()
    stack = [consumer.args[activation_arg(consumer)]]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            continue
        if n.op != "call_function":
            return None
        if weight_of(graph, n) is not None:
            if _weight_dims(graph, n) is None:
                return None
            producers.add(n)
            continue
        t = n.target
        if not (t in _CASTS or t in _VIEWS or (isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags)):
            return None
        stack.extend(a for a in n.all_input_nodes if isinstance(_val(a), torch.Tensor) and _val(a).dim() > 0
                     and _val(a).shape[-1] != 1)
    return producers or None


def _mlp_groups(graph, unsupported) -> list[ChannelGroup]:
    groups, claimed = [], set()
    for node in graph.graph.nodes:
        if node in claimed or weight_of(graph, node) is None or _weight_dims(graph, node) is None:
            continue
        producers = _back_to_producers(graph, node)
        if not producers:
            continue
        order = sorted(producers, key=lambda n: list(graph.graph.nodes).index(n))
        width = int(_val(order[0]).shape[-1])
        walk = _Walk(graph, width)
        try:
            walk.run({p: len(_val(p).shape) - 1 for p in order})
        except Untrackable as e:
            unsupported.append(("mlp", e.node.name, e.reason))
            continue
        claimed.update(walk.consumers)
        index = torch.arange(width).unsqueeze(1)
        prods = []
        for p in order:
            w, out_dim, _, bias = _weight_dims(graph, p)
            prods.append(Member(p, w, out_dim, index, bias))
        cons = []
        for c in walk.consumers:
            w, _, in_dim, bias = _weight_dims(graph, c)
            cons.append(Member(c, w, in_dim, index, bias))
        groups.append(ChannelGroup("mlp", _layer_of(order[0], len(groups)), common_module_path(order + walk.consumers),
                                   width, prods, cons, walk.literals))
    return groups


_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList}
_LAYER_NORM = {aten.layer_norm.default}


class _HiddenWalk(_Walk):
    """The walk over the residual stream: operands that vary along the hidden axis are either norm parameters
    (sliced elementwise) or the outputs of projections/embeddings writing into it (more producers); a
    reduction over the axis with keepdim ends the path (the norm's statistic)."""

    def __init__(self, graph, units: int):
        super().__init__(graph, units)
        self.producers: list = []
        self.elementwise: list = []  # (get_attr, dim)
        self.reductions: list = []

    def grow(self, starts: list) -> None:
        pending = list(starts)
        while pending:
            self.producers.extend(pending)
            self.run_more({p: len(_val(p).shape) - 1 for p in pending})
            pending = [p for p in self._writers() if p not in self.producers]

    def run_more(self, starts: dict) -> None:
        queue = list(starts.items())
        while queue:
            node, ax = queue.pop(0)
            if node in self.axis:
                if self.axis[node] != ax:
                    raise Untrackable(node, "reached along two different axes")
                continue
            self.axis[node] = ax
            for user in list(node.users):
                nxt = self._step(node, user, ax)
                if nxt is not None:
                    queue.extend(nxt)

    def _step(self, src, node, ax):
        t = node.target
        if t in _REDUCTIONS:
            dims = [d % len(_val(src).shape) for d in node.args[1]]
            keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            if dims != [ax] or not keepdim or t != aten.mean.dim:
                raise Untrackable(node, "a reduction over the hidden axis other than a norm's mean(keepdim=True)")
            self.reductions.append(node)
            return None
        if t in _LAYER_NORM:
            if src is not node.args[0] or ax != len(_val(src).shape) - 1 or len(node.args[1]) != 1:
                raise Untrackable(node, "layer_norm over more than the hidden axis")
            self._literal(node, 1, 0)
            for a in node.args[2:4]:
                if isinstance(a, torch.fx.Node):
                    self._param(node, a, 0)
            return [(node, ax)]
        if t == aten.embedding.default:
            raise Untrackable(node, "hidden states index an embedding")
        if t == aten._assert_tensor_metadata.default:  # checks dtype/device, which slicing keeps
            return None
        return super()._step(src, node, ax)

    def _param(self, node, a, dim) -> None:
        if a.op != "get_attr" or not self.graph.is_parameter(a):
            raise Untrackable(node, f"operand '{a.name}' varies along the hidden axis and is not a parameter")
        if (a, dim) not in self.elementwise:
            self.elementwise.append((a, dim))

    def _writers(self) -> list:
        """Projection/embedding outputs that other operands of tracked pointwise ops come from; params recorded."""
        found = []
        for node, ax in list(self.axis.items()):
            if node.op != "call_function" or not (isinstance(node.target, torch._ops.OpOverload)
                                                  and torch.Tag.pointwise in node.target.tags):
                continue
            rank = len(_val(node).shape)
            for a in node.all_input_nodes:
                val = _val(a)
                if a in self.axis or not isinstance(val, torch.Tensor):
                    continue
                pos = ax - (rank - val.dim())
                if pos < 0 or val.shape[pos] == 1:
                    continue
                if a.op == "get_attr":
                    self._param(node, a, pos)
                    continue
                w = _writer(self.graph, a)
                if w is None:
                    raise Untrackable(node, f"operand '{a.name}' varies along the hidden axis and does not come "
                                            "from a projection or an embedding")
                if w not in found:
                    found.append(w)
        return found


def _writer(graph, node: torch.fx.Node) -> torch.fx.Node | None:
    """The projection (weight as a direct operand) or embedding whose output `node` is, through casts and views."""
    while node.op == "call_function" and (node.target in _CASTS or node.target in _VIEWS):
        node = node.args[0]
    if node.op != "call_function":
        return None
    if node.target == aten.embedding.default and graph.is_parameter(node.args[0]):
        return node
    if weight_of(graph, node) is not None and _weight_dims(graph, node) is not None:
        return node
    return None


def _hidden_group(graph) -> ChannelGroup:
    embeds = [n for n in graph.graph.nodes if n.op == "call_function" and n.target == aten.embedding.default
              and graph.is_parameter(n.args[0])]
    if not embeds:
        raise Untrackable(graph.output_node(), "no token embedding starts the residual stream")
    width = int(_val(embeds[0]).shape[-1])
    walk = _HiddenWalk(graph, width)
    walk.grow(embeds[:1])
    index = torch.arange(width).unsqueeze(1)
    prods = []
    for p in walk.producers:
        if p.target == aten.embedding.default:
            prods.append(Member(p, p.args[0], 1, index))
        else:
            w, out_dim, _, bias = _weight_dims(graph, p)
            prods.append(Member(p, w, out_dim, index, bias))
    cons = []
    for c in walk.consumers:
        w, _, in_dim, bias = _weight_dims(graph, c)
        cons.append(Member(c, w, in_dim, index, bias))
    elementwise = [Member(next(iter(a.users)), a, dim, index) for a, dim in walk.elementwise]
    return ChannelGroup("hidden", -1, "", width, prods, cons, walk.literals, elementwise=elementwise,
                        reductions=walk.reductions)


def _fused_split(graph, proj: torch.fx.Node) -> torch.fx.Node:
    """The split node that separates q, k and v after a fused projection."""
    n = proj
    while len(n.users) == 1:
        (n,) = n.users
        if n.target in _SPLITS:
            return n
        if n.target not in _VIEWS and n.target not in _CASTS:
            break
    raise Untrackable(proj, "fused qkv projection without a split into q, k and v")


def _heads_group(graph, site) -> ChannelGroup:
    hd, n_kv = site.head_dim, site.num_kv_heads
    if site.num_heads % n_kv:
        raise Untrackable(site.node, f"{site.num_heads} heads do not divide into {n_kv} KV groups")
    n_rep = site.num_heads // n_kv
    walk = _Walk(graph, n_kv)
    q_index = torch.arange(n_kv * n_rep * hd).view(n_kv, n_rep * hd)
    kv_index = torch.arange(n_kv * hd).view(n_kv, hd)
    if site.fused_qkv:
        if n_rep != 1:
            raise Untrackable(site.q_proj, "fused qkv projection with grouped-query attention")
        split = _fused_split(graph, site.q_proj)
        segments = [_val(u).shape[-1] for u in split.users]
        if len(segments) != 3 or len(set(segments)) != 1 or int(segments[0]) != n_kv * hd:
            raise Untrackable(split, "fused qkv split is not three equal q, k, v parts")
        path = [site.q_proj]
        while path[-1] is not split:
            path.append(next(iter(path[-1].users)))
        walk.run({site.q_proj: len(_val(site.q_proj).shape) - 1}, segmented=path[:-1])
        w, out_dim, _, bias = _weight_dims(graph, site.q_proj)
        fused = torch.cat([kv_index + s * n_kv * hd for s in range(3)], dim=1)
        producers = [Member(site.q_proj, w, out_dim, fused, bias)]
    else:
        projs = (site.q_proj, site.k_proj, site.v_proj)
        walk.run({p: len(_val(p).shape) - 1 for p in dict.fromkeys(projs)})
        producers = []
        for p, index in zip(projs, (q_index, kv_index, kv_index)):
            dims = _weight_dims(graph, p)
            if dims is None:
                raise Untrackable(p, "projection weight is not a direct linear/addmm operand")
            w, out_dim, _, bias = dims
            producers.append(Member(p, w, out_dim, index, bias))
    if walk.consumers != [site.o_proj]:
        raise Untrackable(site.node, "the heads reach a consumer other than the output projection")
    w, _, in_dim, bias = _weight_dims(graph, site.o_proj)
    consumers = [Member(site.o_proj, w, in_dim, q_index, bias)]
    return ChannelGroup("heads", site.layer, site.module, n_kv, producers, consumers, walk.literals,
                        heads_per_unit=n_rep, site=site)


_PASS_BACK = _CASTS | {aten.slice.Tensor, aten.clone.default, aten.alias.default}


def _repeat_literals(node: torch.fx.Node, n_kv: int, n_rep: int) -> list:
    """The literals of a GQA repeat feeding `node` (Hugging Face's repeat_kv: [b, kv, s, d] -> unsqueeze ->
    expand [b, kv, n_rep, s, d] -> reshape [b, kv * n_rep, s, d]): the expand's n_rep and the reshape's head
    count, both of which scale with the query heads each KV group keeps. [] when no repeat feeds `node`."""
    found, views = [], []
    while node.op == "call_function":
        t = node.target
        if t in _VIEWS:
            views.append(node)
        elif t == aten.expand.default:
            before, sizes = _shape(node.args[0]), node.args[1]
            pos = [i for i, v in enumerate(sizes) if isinstance(v, int) and v == n_rep and i < len(before)
                   and before[i] == 1 and i > 0 and isinstance(sizes[i - 1], int) and sizes[i - 1] == n_kv]
            if len(pos) != 1:
                return []
            found.append((node, 1, pos[0]))
            for view in views:
                heads = [i for i, v in enumerate(view.args[1]) if isinstance(v, int) and v == n_kv * n_rep]
                if len(heads) != 1:
                    raise Untrackable(view, "cannot tell the head axis of a GQA repeat's reshape")
                found.append((view, 1, heads[0]))
            return found
        elif t not in _PASS_BACK and t not in (aten.transpose.int, aten.permute.default):
            return []
        node = node.args[0]
    return []


def _query_heads_group(graph, site) -> ChannelGroup | None:
    """Query heads inside KV groups (GQA): q rows and o columns per query head; every KV group keeps as many,
    K and V stay whole. None where every KV group has a single query head (then `heads` is the same thing)."""
    hd, n_kv, heads = site.head_dim, site.num_kv_heads, site.num_heads
    if heads % n_kv or heads == n_kv:
        return None
    if site.fused_qkv:
        raise Untrackable(site.q_proj, "fused qkv projection with grouped-query attention")
    walk = _Walk(graph, heads)
    walk.run({site.q_proj: len(_val(site.q_proj).shape) - 1})
    if walk.consumers != [site.o_proj]:
        raise Untrackable(site.node, "the query heads reach a consumer other than the output projection")
    literals = list(walk.literals)
    for node, ax in walk.axis.items():
        if node.op == "call_function" and (node.target in ATTENTION or node.target in _BATCHED_MATMUL):
            for a in node.all_input_nodes:
                if a not in walk.axis:
                    literals += _repeat_literals(a, n_kv, heads // n_kv)
    index = torch.arange(heads * hd).view(heads, hd)
    w, out_dim, _, bias = _weight_dims(graph, site.q_proj)
    producers = [Member(site.q_proj, w, out_dim, index, bias)]
    w, _, in_dim, bias = _weight_dims(graph, site.o_proj)
    consumers = [Member(site.o_proj, w, in_dim, index, bias)]
    return ChannelGroup("query_heads", site.layer, site.module, heads, producers, consumers, literals,
                        heads_per_unit=n_kv, site=site, per_kv_group=n_kv)


def channel_groups(graph) -> ChannelGroups:
    unsupported: list = []
    mlp = _mlp_groups(graph, unsupported)
    heads, query_heads = [], []
    for site in graph.analysis("attention_sites"):
        if None in (site.q_proj, site.k_proj, site.v_proj, site.o_proj):
            unsupported.append(("heads", site.node.name, "projections not found"))
            continue
        try:
            heads.append(_heads_group(graph, site))
        except Untrackable as e:
            unsupported.append(("heads", e.node.name, e.reason))
        try:
            group = _query_heads_group(graph, site)
            if group is not None:
                query_heads.append(group)
        except Untrackable as e:
            unsupported.append(("query_heads", e.node.name, e.reason))
    hidden, hidden_unsupported = [], []
    try:
        hidden.append(_hidden_group(graph))
    except Untrackable as e:
        hidden_unsupported.append(("hidden", e.node.name, e.reason))
    return ChannelGroups(mlp, heads, unsupported, hidden, hidden_unsupported=hidden_unsupported,
                         query_heads=query_heads)
