"""The text format of `prunus dump`: the readable IR, a per-layer table and the pass report; and diffs."""
from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console
from rich.table import Table

from prunus.dump import analysis
from prunus.dump.sources import Source
from prunus.errors import ArtifactError

WIDTH = 120


def _render(*renderables) -> str:
    out = io.StringIO()
    console = Console(file=out, width=WIDTH, color_system=None, force_terminal=False, markup=False)
    for r in renderables:
        console.print(r)
    return out.getvalue()


def _num(n) -> str:
    return "-" if n is None else f"{n:,}"


def _delta(before, after) -> str:
    return _num(after) if before == after else f"{_num(before)} -> {_num(after)} ({after - before:+,})"


def ir_text(view: dict) -> str:
    """One line per op, `name = target(args) : type`, under a header per module path (as `to_text`)."""
    lines = [f"# {len(view['inputs'])} input(s), {view['num_parameters']:,} parameters"]
    lines += [f"input {i['name']}: {i['type']}" for i in view["inputs"]]
    current = None
    for node in analysis.ops(view):
        if node["module"] != current:
            current = node["module"]
            lines.append((current or "<top>") + (f" ({node['module_type']})" if node["module_type"] else ""))
        args = node["args"] + [f"{k}={v}" for k, v in node["kwargs"].items()]
        lines.append(f"  {node['name']} = {node['target']}({', '.join(args)}) : {node['type']}")
    outputs = [n for n in view["nodes"] if n["op"] == "output"]
    if outputs:
        lines.append(f"output {', '.join(view['outputs'])} = {', '.join(outputs[0]['args'])}")
    if view.get("history"):
        lines.append("history:")
        lines += [f"  {i + 1}. {h['spec']}" for i, h in enumerate(view["history"])]
    return "\n".join(lines) + "\n"


def layer_table(view: dict, flops_at: str) -> Table:
    """Ops, parameters, FLOPs and KV bytes per token for each layer, with a total row."""
    rows = analysis.layer_table(view)
    total = analysis.totals(view)
    table = Table(title="per layer", show_footer=True)
    table.add_column("layer", footer="total")
    table.add_column("module")
    table.add_column("ops", justify="right", footer=_num(total["ops"]))
    table.add_column("parameters", justify="right", footer=_num(total["parameters"]))
    table.add_column(f"FLOPs ({flops_at})", justify="right", footer=_num(total["flops"]))
    table.add_column("KV bytes/token", justify="right", footer=_num(total["kv_bytes_per_token"]))
    for r in rows:
        table.add_row("-" if r["layer"] is None else str(r["layer"]), r["group"], _num(r["ops"]),
                      _num(r["parameters"]), _num(r["flops"]), _num(r["kv_bytes_per_token"]))
    return table


def report_table(source: Source):
    """The artifact's report as `prunus.report_table` draws it."""
    from prunus.api import report_table as table_of
    from prunus.passes.manager import PassRecord

    try:
        records = [PassRecord(**r) for r in source.report]
    except TypeError as e:
        raise ArtifactError(f"{source.path}: the report in pipeline.json does not match this prunus: {e}") from e
    # report_table reads only the pipeline text and the records.
    return table_of(SimpleNamespace(pipeline=source.pipeline or "", report=records), title="pass report")


def render(source: Source, label: str, view: dict) -> str:
    """The IR, then the per-layer table, then the pass report when the source has one."""
    head = [f"# prunus dump: {source.path} ({source.kind}, graph {label})"]
    if source.pipeline is not None:
        head.append(f"# pipeline: {source.pipeline or '(none)'}")
    tables = [layer_table(view, source.flops_at)]
    if source.report:
        tables.append(report_table(source))
    text = "\n".join(head) + "\n" + ir_text(view) + "\n" + _render(*tables)
    for name, code in source.kernels:
        text += f"\n# kernels/{name}\n{code}"
    return text


def render_diff(diff: dict) -> str:
    """Totals, per-layer deltas, then the op changes as a unified-diff-like list per (module, op)."""
    t = diff["totals"]
    summary = Table(title=f"diff: {diff['before']} -> {diff['after']}")
    for col in ("", "before", "after", "delta"):
        summary.add_column(col, justify="right" if col else "left")
    for key in ("ops", "parameters", "flops", "kv_bytes_per_token"):
        b, a = t["before"][key], t["after"][key]
        summary.add_row(key, _num(b), _num(a), "-" if a is None or b is None else f"{a - b:+,}")
    layers = Table(title="per layer")
    for col in ("layer", "module", "ops", "parameters", "FLOPs"):
        layers.add_column(col, justify="right" if col in ("ops", "parameters", "FLOPs") else "left")
    for r in diff["layers"]:
        layers.add_row("-" if r["layer"] is None else str(r["layer"]), r["group"],
                       *(_delta(r[f"{k}_before"], r[f"{k}_after"]) for k in ("ops", "parameters", "flops")))
    counts = ", ".join(f"{n} {status}" for status, n in sorted(diff["count"].items())) or "no op changed"
    lines = [f"op changes, matched by module path and op ({counts}); '%' is a reference to another value:"]
    for c in diff["ops"]:
        lines.append(f"{_MARK[c['status']]} {c['module'] or '<top>'}  {c['target']}  {c['before']} -> {c['after']}")
        lines += [f"    - {_times(n)}{sig}" for sig, n in c["removed"].items()]
        lines += [f"    + {_times(n)}{sig}" for sig, n in c["added"].items()]
    return _render(summary, layers) + "\n".join(lines) + "\n"


_MARK = {"added": "+", "removed": "-", "changed": "~"}


def _times(n: int) -> str:
    return f"{n} x " if n > 1 else ""
