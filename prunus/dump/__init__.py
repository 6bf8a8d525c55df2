"""`prunus dump`: show a graph at any pipeline step, as text, JSON, Graphviz or a self-contained HTML page.

PATH is an artifact directory (`OptimizedModel.save`), a `.pt2` program or an `.onnx` file. `after` picks
the snapshot after one pass of an artifact's pipeline; `diff` compares with another PATH, op by op
(matched by module path and op), with parameter and FLOPs deltas per layer.
"""
from __future__ import annotations

import json

from prunus.dump import analysis
from prunus.dump.dot import graphviz, render_dot, render_svg
from prunus.dump.html import render_html
from prunus.dump.sources import Source, open_source
from prunus.dump.text import render, render_diff
from prunus.errors import SpecError

FORMATS = ("text", "json", "dot", "svg", "html")
DIFF_FORMATS = ("text", "json", "html")


def dump(path: str, fmt: str = "text", after: str | None = None, diff: str | None = None) -> str | bytes:
    """The graph at `path` (after pass `after`) rendered as `fmt`; with `diff`, its differences from `diff`.

    Returns text, except bytes for svg. Raises `ArtifactError` for an unreadable path or an unknown pass,
    `SpecError` for an unknown format, `ExportError` for svg without Graphviz.
    """
    if fmt not in FORMATS:
        raise SpecError(f"unknown dump format {fmt!r}", key="format", accepted=", ".join(FORMATS))
    if diff is not None and fmt not in DIFF_FORMATS:
        raise SpecError(f"--diff cannot be shown as {fmt}", key="format", accepted=", ".join(DIFF_FORMATS))
    dot_exe = graphviz() if fmt == "svg" else None  # before reading anything, which can take seconds
    source = open_source(path)
    label, view = source.select(after)
    if diff is not None:
        other = open_source(diff)
        other_label, other_view = other.select()
        changes = {"before": _name(source, label), "after": _name(other, other_label),
                   **analysis.diff_views(view, other_view)}
        if fmt == "json":
            return json.dumps(changes, indent=1, default=str)
        if fmt == "text":
            return render_diff(changes)
        return render_html(source, label, view, changes)
    if fmt == "text":
        return render(source, label, view)
    if fmt == "json":
        return json.dumps({**view, "source": {"path": source.path, "kind": source.kind, "graph": label,
                                              "snapshots": [s for s, _ in source.snapshots],
                                              "pipeline": source.pipeline, "flops_at": source.flops_at},
                           "layers": analysis.layer_table(view), "report": source.report}, indent=1, default=str)
    if fmt == "html":
        return render_html(source, label, view)
    dot = render_dot(view, f"{source.path} ({label})")
    return dot if dot_exe is None else render_svg(dot, dot_exe)


def _name(source: Source, label: str) -> str:
    return source.path if source.kind != "artifact" else f"{source.path} ({label})"


__all__ = ["DIFF_FORMATS", "FORMATS", "dump"]
