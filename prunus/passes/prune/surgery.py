"""Physically removing units: slice every member weight and bias, rewrite the shape literals, compensate.

New `nn.Parameter`s replace the old ones under the same names on the GraphModule; the old tensors, which
the user's model shares, are never written. FLAP's bias compensation (An et al., AAAI 2024) folds the
removed channels' mean contribution `W[:, removed] @ mean(X[removed])` into the consumer's bias, creating
one where the consumer had none.
"""
from __future__ import annotations

import torch
import torch.fx

from prunus.errors import PassError
from prunus.ir.analyses.channel_groups import ChannelGroup, Member

aten = torch.ops.aten


def _owner(graph, target: str):
    owner, _, attr = target.rpartition(".")
    return (graph.gm.get_submodule(owner) if owner else graph.gm), attr


def _check_private(graph, node: torch.fx.Node, users: set, pass_name: str) -> None:
    """A pruned parameter must be read only by its group's matmuls, under one name in the graph (not tied)."""
    if not graph.is_parameter(node):
        raise PassError(pass_name, f"'{node.target}' is not a parameter, so it cannot be sliced", node=node.name)
    others = [u.name for u in node.users if u not in users]
    if others:
        raise PassError(pass_name, f"weight '{node.target}' is also read by {others}; pruning it would change "
                                   "them too", node=node.name)
    read = {n.target for n in graph.graph.nodes if n.op == "get_attr" and n.users}
    tied = [n for n in _aliases(graph, node) if n in read]
    if tied:
        raise PassError(pass_name, f"weight '{node.target}' is tied to {tied}", node=node.name)


def _aliases(graph, node: torch.fx.Node) -> list[str]:
    """Other names of the same parameter (a tied embedding); the graph reads at most one of them."""
    value = graph.get_attr_value(node)
    return [n for n, p in graph.gm.named_parameters(remove_duplicate=False) if p is value and n != node.target]


def _replace(graph, node: torch.fx.Node, value: torch.Tensor) -> None:
    new = torch.nn.Parameter(value.contiguous(), requires_grad=False)
    for target in [node.target, *_aliases(graph, node)]:  # aliases the graph does not read stay tied to it
        mod, attr = _owner(graph, target)
        mod._parameters[attr] = new


def _select(graph, node, dim: int, idx: torch.Tensor) -> torch.Tensor:
    value = graph.get_attr_value(node).detach()
    return value.index_select(dim, idx.to(value.device))


def _channels(member: Member, units: torch.Tensor) -> torch.Tensor:
    """The channels of `units` in their original order (a fused qkv interleaves units across q, k and v)."""
    return member.index[units].flatten().sort().values


def compensation(graph, member: Member, removed: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """W[:, removed] @ mean(X[removed]): the consumer output the removed channels contributed on average."""
    idx = _channels(member, removed)
    w = graph.get_attr_value(member.weight).detach().double().movedim(member.dim, -1)[..., idx]
    return w @ mean.double()[idx]


def _add_bias(graph, member: Member, delta: torch.Tensor, pass_name: str) -> None:
    node = member.node
    if member.bias is not None:
        _check_private(graph, member.bias, {node}, pass_name)
        old = graph.get_attr_value(member.bias).detach()
        _replace(graph, member.bias, old + delta.to(old.dtype))
        return
    if node.target != aten.linear.default:
        raise PassError(pass_name, "bias compensation needs a bias on this consumer", node=node.name)
    weight = graph.get_attr_value(member.weight)
    mod, _ = _owner(graph, member.weight.target)
    attr = next(name for name in ("bias", *(f"bias{i}" for i in range(len(mod._parameters) + 1)))
                if not hasattr(mod, name))
    mod.register_parameter(attr, torch.nn.Parameter(delta.to(weight.dtype), requires_grad=False))
    prefix = member.weight.target.rpartition(".")[0]
    with graph.graph.inserting_before(node):
        bias = graph.graph.get_attr(f"{prefix}.{attr}" if prefix else attr)
    node.args = (node.args[0], node.args[1], bias)
    member.bias = bias


def prune_group(graph, group: ChannelGroup, keep: torch.Tensor, pass_name: str,
                means: dict | None = None) -> None:
    """Keep units `keep` (ascending) of `group`; with `means` (consumer node -> input mean), compensate.

    A weight shared by several members (a tied embedding and output head reading the hidden dimension) is
    sliced once, and only when every member cuts it the same way."""
    n, k = group.units, len(keep)
    if k == n:
        return
    removed = torch.tensor(sorted(set(range(n)) - set(keep.tolist())), dtype=torch.long)
    sliced: dict = {}  # get_attr -> (dim, channels)

    def cut(node, dim, idx):
        if node in sliced:
            if sliced[node][0] != dim or not torch.equal(sliced[node][1], idx):
                raise PassError(pass_name, f"weight '{node.target}' is shared by members that prune it differently",
                                node=node.name)
            return
        sliced[node] = (dim, idx)
        _replace(graph, node, _select(graph, node, dim, idx))

    users = {m.node for m in group.members + group.elementwise}
    for m in group.members + group.elementwise:
        _check_private(graph, m.weight, users, pass_name)
    deltas = {m: compensation(graph, m, removed, means[m.node]) for m in group.consumers} if means else {}
    for m in group.producers:
        idx = _channels(m, keep)
        cut(m.weight, m.dim, idx)
        if m.bias is not None:
            _check_private(graph, m.bias, {m.node}, pass_name)
            cut(m.bias, 0, idx)
    for m in group.consumers:
        if m in deltas:
            _add_bias(graph, m, deltas[m], pass_name)
        cut(m.weight, m.dim, _channels(m, keep))
    for m in group.elementwise:
        cut(m.weight, m.dim, _channels(m, keep))
    for node, arg, pos in group.literals:
        _rewrite_literal(node, arg, pos, n, k, pass_name)
    for node in group.reductions:
        _rescale_mean(graph, node, k / n)


def _rescale_mean(graph, node: torch.fx.Node, factor: float) -> None:
    """mean over the kept channels * k/n = the sum over them / n: the statistic of the original width with the
    removed channels reading zero, so a norm whose removed inputs carry nothing computes what it did."""
    with graph.graph.inserting_after(node):
        scaled = graph.graph.call_function(aten.mul.Tensor, (node, factor))
    scaled.meta = dict(node.meta)
    node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)


def _scaled(value: int, n: int, k: int, node, pass_name: str) -> int:
    """`value` x k / n: a size along the pruned axis (a multiple of the units), or a GQA repeat count (the query
    heads per KV group: n_rep x k / n is the count each group keeps)."""
    if value * k % n:
        raise PassError(pass_name, f"shape literal {value} does not scale from {n} to {k} units", node=node.name)
    return value * k // n


def _rewrite_literal(node: torch.fx.Node, arg: int, pos, n: int, k: int, pass_name: str) -> None:
    args = list(node.args)
    if pos is None:
        args[arg] = _scaled(args[arg], n, k, node, pass_name)
    elif pos == "all":
        args[arg] = [_scaled(v, n, k, node, pass_name) for v in args[arg]]
    else:
        sizes = list(args[arg])
        sizes[pos] = _scaled(sizes[pos], n, k, node, pass_name)
        args[arg] = sizes
    node.args = tuple(args)
