"""The machinery every token-dropping method shares: emit ATen nodes, select, gather, rewire the rest.

A *token point* replaces the residual stream at one node by a shorter one (kept tokens, or merged ones)
and makes everything downstream consistent: each tensor computed before the point that a downstream node
reads and that carries the token dimension (sequence-flow analysis: RoPE tables, masks in both token dims,
positions) is gathered with the same indices, and every size that named the old token count names the new
one. The new count is symbolic where the old one was (`k = s - floor((1 - keep) * s)`, built from the
`sym_size` of the stream), so FakeTensorProp and torch.export see correct shapes at every length.
"""
from __future__ import annotations

import math
import operator
from fractions import Fraction

import torch
import torch.fx
from torch.utils import _pytree as pytree

from prunus.errors import PassError
from prunus.ir.analyses.sequence_flow import involves, token_dims

aten = torch.ops.aten
FORCED = 1e30  # score of sink / protected tokens; the last position gets +inf so it wins every tie


class Emitter:
    """Creates call_function nodes (placed before the output; `toposort` orders them afterwards)."""

    def __init__(self, graph, device: torch.device, tag: dict | None = None):
        self.g = graph.graph
        self.device = device
        self.anchor = graph.output_node()
        self.tag = tag or {}
        self.created: set[torch.fx.Node] = set()

    def __call__(self, target, *args, **kwargs) -> torch.fx.Node:
        with self.g.inserting_before(self.anchor):
            node = self.g.call_function(target, args, kwargs)
        node.meta["prunus_tokens"] = dict(self.tag)
        self.created.add(node)
        return node

    def arange(self, length) -> torch.fx.Node:
        """int64 positions 0..length-1 on the graph's device."""
        return self(aten.arange.start, 0, length, dtype=torch.int64, device=self.device)

    def size(self, node: torch.fx.Node, dim: int):
        """The size of `node`'s dim as a graph value: an int if static, else a `sym_size` node."""
        val = node.meta.get("val")
        if val is not None and not isinstance(val.shape[dim], torch.SymInt):
            return int(val.shape[dim])
        return self(aten.sym_size.int, node, dim)


def kept_count(em: Emitter, length, keep: float):
    """`length - floor((1 - keep) * length)` (= ceil(keep * length), in [1, length]) as an int or SymInt node."""
    drop = Fraction(1 - keep).limit_denominator(1000)
    if isinstance(length, int):
        return length - (length * drop.numerator) // drop.denominator
    if drop == 0:
        return length
    dropped = em(operator.floordiv, em(operator.mul, length, drop.numerator), drop.denominator)
    return em(operator.sub, length, dropped)


def priority(em: Emitter, scores: torch.fx.Node, length, sink: int, protect_last: int) -> torch.fx.Node:
    """Scores with the first `sink` and last `protect_last` positions forced in (the very last above all)."""
    pos = em.arange(length)
    rev = em(aten.flip.default, pos, [0])  # rev[p] = length - 1 - p
    forced = em(aten.bitwise_or.Tensor, em(aten.lt.Scalar, pos, sink), em(aten.lt.Scalar, rev, protect_last))
    scores = em(aten.masked_fill.Scalar, scores, forced, FORCED)
    return em(aten.masked_fill.Scalar, scores, em(aten.eq.Scalar, rev, 0), math.inf)


def select(em: Emitter, scores: torch.fx.Node, k) -> torch.fx.Node:
    """Indices [b, k] of the `k` best scores of [b, n], sorted so kept tokens stay in their original order."""
    top = em(operator.getitem, em(aten.topk.default, scores, k, -1, True, False), 1)
    return em(operator.getitem, em(aten.sort.default, top, -1), 0)


def gather(em: Emitter, x: torch.fx.Node, idx: torch.fx.Node, dims: tuple[int, ...], batch,
           pass_name: str) -> torch.fx.Node:
    """`x` indexed by `idx` [b, k] along each of `dims` (its token dims); a batch-1 `x` is expanded first."""
    val = x.meta["val"]
    rank = val.dim()
    if rank == 0 or 0 in dims:
        raise PassError(pass_name, f"tensor {tuple(val.shape)} carries the token dimension but has no batch "
                                   "dimension in front; cannot gather it per sequence", node=x.name)
    b0 = val.shape[0]
    same_batch = (b0.node.expr if isinstance(b0, torch.SymInt) else int(b0)) == batch
    if not same_batch:
        if isinstance(b0, torch.SymInt) or int(b0) != 1:
            raise PassError(pass_name, f"tensor {tuple(val.shape)} carries the token dimension but its first "
                                       "dim is neither the batch nor 1", node=x.name)
        x = em(aten.expand.default, x, [em.size(idx, 0)] + [-1] * (rank - 1))
    b, k = em.size(idx, 0), em.size(idx, 1)
    done = set()
    for d in dims:
        view = [b if i == 0 else k if i == d else 1 for i in range(rank)]
        sizes = [-1 if i in (0, d) else k if i in done else
                 (val.shape[i] if isinstance(val.shape[i], int) else em.size(x, i)) for i in range(rank)]
        index = em(aten.expand.default, em(aten.view.default, idx, view), sizes)
        x = em(aten.gather.default, x, d, index)
        done.add(d)
    return x


def descendants(node: torch.fx.Node) -> set:
    seen, stack = {node}, [node]
    while stack:
        for u in stack.pop().users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def ancestors(nodes, stop: set) -> set:
    """Ancestors of `nodes` (included) inside the set `stop`."""
    seen, stack = set(), [n for n in nodes if n in stop]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes if a in stop)
    return seen


def rewire(graph, em: Emitter, point: torch.fx.Node, new_stream: torch.fx.Node, idx: torch.fx.Node, new_len,
           region: set, pass_name: str) -> int:
    """Make `region` (what reads the stream at `point`, and the outputs) run on `new_stream` [b, k, h].

    `idx` [b, k] are the positions (within the stream at `point`) that survive, in order; `new_len` is k
    (a SymInt node, or an int for fixed-length models, whose shape literals are rewritten). Returns how
    many side tensors were gathered.
    """
    val = point.meta["val"]
    old = val.shape[1]
    count = old.node.expr if isinstance(old, torch.SymInt) else int(old)
    batch = val.shape[0].node.expr if isinstance(val.shape[0], torch.SymInt) else int(val.shape[0])
    gathered: dict = {}

    def side(a: torch.fx.Node):
        if a is point:
            return new_stream
        if a in region or a in em.created or not isinstance(a, torch.fx.Node):
            return a
        v = a.meta.get("val")
        if isinstance(v, torch.SymInt):
            if isinstance(count, int) or not involves(a, old):
                return a
            if v.node.expr == count:
                return new_len
            raise PassError(pass_name, f"size {v} depends on the token count but is not the count itself; "
                                       "cannot rewrite it for the kept tokens", node=a.name)
        if not isinstance(v, torch.Tensor):
            return a
        dims = token_dims(a, old)
        if not dims:
            if involves(a, old):
                raise PassError(pass_name, f"tensor {tuple(v.shape)} depends on the token count in a way "
                                           "token dropping cannot gather", node=a.name)
            return a
        if a not in gathered:
            gathered[a] = gather(em, a, idx, dims, batch, pass_name)
        return gathered[a]

    def literal(x):
        return new_len if isinstance(x, int) and not isinstance(x, bool) and x == count else x

    for node in [n for n in graph.graph.nodes if n in region]:
        args, kwargs = pytree.tree_map_only(torch.fx.Node, side, (node.args, node.kwargs))
        if isinstance(count, int) and node.op == "call_function":
            args = tuple([literal(x) for x in a] if isinstance(a, (list, tuple)) and not isinstance(a, torch.fx.Node)
                         else a for a in args)
        node.args, node.kwargs = args, kwargs
    return len(gathered)


def toposort(graph) -> None:
    """Reorder the graph so every node follows its inputs, keeping the existing order where it already does."""
    nodes = list(graph.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    order, done = [], set()
    for root in nodes:
        stack = [(root, False)]
        while stack:
            n, expanded = stack.pop()
            if n in done:
                continue
            if expanded:
                done.add(n)
                order.append(n)
                continue
            stack.append((n, True))
            for a in sorted(n.all_input_nodes, key=position.get, reverse=True):
                if a not in done:
                    stack.append((a, False))
    prev = None
    for n in order:
        if prev is not None and prev.next is not n:
            prev.append(n)
        prev = n
