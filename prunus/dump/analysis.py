"""What the dump formats share about an IR view: layer groups, per-layer figures, KV bytes, and diffs.

A view is the dict of `prunus.ir.printer.to_dict` (or the same shape built from ONNX): `nodes` with
`name`, `op`, `target`, `args`, `kwargs`, `type` (like "f32[batch, seq, 64]"), `module`, `flops`, and
`parameters` with `name`, `shape`, `dtype`, `numel` (and `module` where the name is not a module path).
"""
from __future__ import annotations

import re
from collections import Counter

from prunus.ir.graph import layer_index

NON_OPS = ("placeholder", "get_attr", "output")
OUTSIDE = "(outside layers)"

# Attention ops whose K and V operands are [batch, heads..., tokens, head_dim] (SDPA and ONNX Attention).
ATTENTION_TARGETS = {"aten.scaled_dot_product_attention", "Attention"}
# Ops between a K/V projection and the attention op that only reshape or repeat heads (the GQA repeat):
# walking back through them finds the tensor a KV cache stores, before its heads are repeated.
_HEAD_REPEAT = {"aten.reshape", "aten.view", "aten._unsafe_view", "aten.expand", "aten.unsqueeze",
                "aten.slice.Tensor", "aten.clone", "aten.contiguous", "aten.repeat_interleave.self_int",
                "aten.alias", "Reshape", "Expand", "Unsqueeze", "Slice", "Identity"}
_BYTES = {"f64": 8, "i64": 8, "f32": 4, "i32": 4, "f16": 2, "bf16": 2, "i16": 2, "i8": 1, "u8": 1, "bool": 1,
          "f8e4m3": 1, "f8e5m2": 1}
_TYPE = re.compile(r"^(\w+)\[(.*)\]$")
_NAME = re.compile(r"[A-Za-z_][\w.]*")


def ops(view: dict) -> list[dict]:
    """The nodes that compute something (not inputs, parameter reads or the output)."""
    return [n for n in view["nodes"] if n["op"] not in NON_OPS]


def layer_prefix(path: str) -> str | None:
    """The module path up to its layer index: 'model.layers.3.mlp.up_proj' -> 'model.layers.3'."""
    if layer_index(path) is None:
        return None
    parts = path.split(".")
    first = next(i for i, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[:first + 1])


def groups(view: dict) -> list[tuple[str, int | None, list[dict]]]:
    """Ops grouped by layer, as (key, layer index, ops), in graph order.

    Ops outside any layer go to '(before layers)' or '(after layers)' by where they appear, or all to
    '(outside layers)' in a graph without layers.
    """
    out: dict[str, tuple[int | None, list]] = {}
    nodes = ops(view)
    seen_layer = False
    before = "(before layers)" if any(layer_prefix(n["module"]) for n in nodes) else OUTSIDE
    for node in nodes:
        prefix = layer_prefix(node["module"])
        if prefix is None:
            key, layer = ("(after layers)" if seen_layer else before), None
        else:
            key, layer, seen_layer = prefix, layer_index(prefix), True
        out.setdefault(key, (layer, []))[1].append(node)
    return [(key, layer, nodes) for key, (layer, nodes) in out.items()]


def _parse_type(type_str: str) -> tuple[str, list[str]] | None:
    m = _TYPE.match(type_str or "")
    return (m.group(1), [d.strip() for d in m.group(2).split(",")]) if m else None


def _per_token_bytes(type_str: str) -> int | None:
    """Bytes per token of a [batch, heads..., tokens, head_dim] tensor; None unless those sizes are integers."""
    parsed = _parse_type(type_str)
    if parsed is None or len(parsed[1]) < 3 or parsed[0] not in _BYTES:
        return None
    per_token = [d for i, d in enumerate(parsed[1]) if i not in (0, len(parsed[1]) - 2)]
    if not all(d.isdigit() for d in per_token):
        return None
    size = _BYTES[parsed[0]]
    for d in per_token:
        size *= int(d)
    return size


def _cached_bytes(name: str, producers: dict) -> int | None:
    """Per-token bytes of an attention operand before its heads were repeated (the smallest along the way)."""
    best = None
    node = producers.get(name)
    while node is not None:
        size = _per_token_bytes(node["type"])
        if size is not None:
            best = size if best is None else min(best, size)
        if node["target"] not in _HEAD_REPEAT or not node["args"]:
            break
        node = producers.get(node["args"][0])
    return best


def producers(view: dict) -> dict[str, dict]:
    """Value name -> the node producing it (an ONNX node with several outputs is named 'a, b')."""
    return {name: n for n in view["nodes"] for name in n["name"].split(", ")}


def kv_bytes_per_token(view: dict) -> dict[str, int]:
    """Layer group -> bytes a KV cache holds per token of context (K and V of every attention op in it)."""
    by_name = producers(view)
    out: Counter = Counter()
    for node in ops(view):
        if node["target"] not in ATTENTION_TARGETS or len(node["args"]) < 3:
            continue
        k, v = (_cached_bytes(a, by_name) for a in node["args"][1:3])
        if k is not None and v is not None:
            out[layer_prefix(node["module"]) or OUTSIDE] += k + v
    return dict(out)


def layer_table(view: dict) -> list[dict]:
    """One row per layer group, then one for everything outside layers: ops, parameters, FLOPs, KV bytes.

    Parameters count once, in the layer their name (or the module using them) belongs to, so the rows
    sum to `num_parameters`.
    """
    rows: dict[str, dict] = {}

    def row(key: str, layer: int | None) -> dict:
        return rows.setdefault(key, {"group": key, "layer": layer, "ops": 0, "parameters": 0, "flops": 0,
                                     "kv_bytes_per_token": None})

    for key, layer, nodes in groups(view):
        r = row(key if layer is not None else OUTSIDE, layer)
        r["ops"] += len(nodes)
        r["flops"] += sum(n.get("flops") or 0 for n in nodes)
    for p in view["parameters"]:
        prefix = layer_prefix(p.get("module") or p["name"])
        row(prefix or OUTSIDE, layer_index(prefix) if prefix else None)["parameters"] += p["numel"]
    for key, kv in kv_bytes_per_token(view).items():
        row(key, layer_index(key) if key != OUTSIDE else None)["kv_bytes_per_token"] = kv
    layers = [r for r in rows.values() if r["layer"] is not None]
    return layers + [rows[OUTSIDE]] if OUTSIDE in rows else layers


def totals(view: dict) -> dict:
    """Ops, parameters, FLOPs and KV bytes per token of the whole graph."""
    kv = [r["kv_bytes_per_token"] for r in layer_table(view) if r["kv_bytes_per_token"] is not None]
    return {"ops": len(ops(view)), "parameters": view["num_parameters"],
            "flops": sum(n.get("flops") or 0 for n in ops(view)), "kv_bytes_per_token": sum(kv) if kv else None}


def references(node: dict, names: set[str] | dict) -> list[str]:
    """The values among `names` that a node reads, in argument order (lists and kwargs included)."""
    text = list(node["args"]) + list(node["kwargs"].values())
    return [m for a in text for m in _NAME.findall(a) if m in names]


def signature(node: dict, names: set[str]) -> str:
    """`target(args) : type` with references to other values written '%', so renamed nodes compare equal."""
    def norm(a: str) -> str:
        return _NAME.sub(lambda m: "%" if m.group(0) in names else m.group(0), a)

    args = [norm(a) for a in node["args"]] + [f"{k}={norm(v)}" for k, v in node["kwargs"].items()]
    return f"{node['target']}({', '.join(args)}) : {node['type']}"


def _value_names(view: dict) -> set[str]:
    names = set(producers(view))
    names.update(n["target"] for n in view["nodes"] if n["op"] == "get_attr")
    names.update(p["name"] for p in view["parameters"])
    return names


def diff_views(before: dict, after: dict) -> dict:
    """Ops added, removed or changed from `before` to `after`, matched by module path and op target.

    Within one (module, target) the ops compare as multisets of signatures; `removed`/`added` map the
    signatures only one side has to how many more times it has them. `layers` and `totals` hold the
    ops, parameters and FLOPs of both sides.
    """
    sides = []
    for view in (before, after):
        names = _value_names(view)
        by_key: dict[tuple[str, str], Counter] = {}
        for node in ops(view):
            by_key.setdefault((node["module"], node["target"]), Counter())[signature(node, names)] += 1
        sides.append(by_key)
    changes = []
    for key in list(sides[0]) + [k for k in sides[1] if k not in sides[0]]:
        a, b = sides[0].get(key, Counter()), sides[1].get(key, Counter())
        if a == b:
            continue
        n_a, n_b = sum(a.values()), sum(b.values())
        status = "added" if n_a == 0 else "removed" if n_b == 0 else "changed"
        changes.append({"module": key[0], "target": key[1], "status": status, "before": n_a, "after": n_b,
                        "removed": dict(sorted((a - b).items())), "added": dict(sorted((b - a).items()))})
    rows_a = {r["group"]: r for r in layer_table(before)}
    rows_b = {r["group"]: r for r in layer_table(after)}
    layers = []
    for group in list(rows_a) + [g for g in rows_b if g not in rows_a]:
        ra, rb = rows_a.get(group), rows_b.get(group)
        layers.append({"group": group, "layer": (ra or rb)["layer"],
                       **{f"{k}_{side}": (r[k] if r else 0) for k in ("ops", "parameters", "flops")
                          for side, r in (("before", ra), ("after", rb))}})
    return {"ops": changes, "layers": layers,
            "totals": {"before": totals(before), "after": totals(after)},
            "count": dict(Counter(c["status"] for c in changes))}
