"""Graphviz output of `prunus dump`: DOT source with one cluster per layer, and SVG through the `dot` binary."""
from __future__ import annotations

import shutil
import subprocess

from prunus.dump import analysis
from prunus.errors import ExportError

NO_DOT = "svg needs Graphviz's `dot` (apt-get install graphviz); use --format dot or html"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _label(node: dict) -> str:
    head = {"placeholder": f"input {node['name']}", "output": "output"}.get(node["op"], node["target"])
    return f"{head}\n{node['type']}" if node["type"] else head


def render_dot(view: dict, title: str) -> str:
    """DOT source: inputs, ops and the output as boxes labelled op and type; each layer is one cluster."""
    drawn = [n for n in view["nodes"] if n["op"] != "get_attr"]
    ids = {name: f"n{i}" for i, n in enumerate(drawn) for name in n["name"].split(", ")}
    top, clusters = [], {}
    for i, node in enumerate(drawn):
        decl = f"    n{i} [label={_quote(_label(node))}];"
        prefix = analysis.layer_prefix(node["module"]) if node["op"] not in ("placeholder", "output") else None
        (clusters.setdefault(prefix, []) if prefix else top).append(decl)
    lines = ["digraph prunus {",
             f"  graph [label={_quote(title)}, labelloc=t, fontname=Helvetica];",
             '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", fontname=Helvetica, fontsize=10];',
             *(d[2:] for d in top)]
    for k, (prefix, decls) in enumerate(clusters.items()):
        lines += [f"  subgraph cluster_{k} {{", f"    label={_quote(prefix)};",
                  '    style="rounded,filled"; fillcolor="#fafafa";', *decls, "  }"]
    edges = dict.fromkeys(f"  {ids[ref]} -> n{i};" for i, node in enumerate(drawn)
                          for ref in analysis.references(node, ids) if ids[ref] != f"n{i}")
    return "\n".join(lines + list(edges) + ["}"]) + "\n"


def graphviz() -> str:
    """The path of Graphviz's `dot`; `ExportError` when it is not installed."""
    exe = shutil.which("dot")
    if exe is None:
        raise ExportError(NO_DOT)
    return exe


def render_svg(dot_source: str, exe: str) -> bytes:
    """SVG bytes from DOT source through the `dot` at `exe`; `ExportError` when it fails."""
    done = subprocess.run([exe, "-Tsvg"], input=dot_source.encode(), capture_output=True, check=False)
    if done.returncode != 0:
        raise ExportError(f"Graphviz `dot -Tsvg` failed: {done.stderr.decode(errors='replace').strip()[:500]}")
    return done.stdout
