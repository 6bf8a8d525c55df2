"""The html format of `prunus dump`: one self-contained page (inline CSS and JS, nothing fetched).

The data is embedded as JSON in a `<script type="application/json">` tag and rendered by a small vanilla
script: the graph grouped by layer in collapsible sections, a search over op names and module paths,
the per-layer and report tables, and the diffs between consecutive snapshots (rendered when opened).
"""
from __future__ import annotations

import html
import json

from prunus.dump import analysis
from prunus.dump.sources import Source


def _node_row(node: dict) -> list:
    args = node["args"] + [f"{k}={v}" for k, v in node["kwargs"].items()]
    return [node["name"], node["target"], ", ".join(args), node["type"], node["module"], node.get("flops") or 0]


def page_data(source: Source, label: str, view: dict, diff: dict | None = None) -> dict:
    """Everything the page shows, as plain JSON-able data."""
    passes = [{"before": a[0], "after": b[0], **analysis.diff_views(a[1], b[1])}
              for a, b in zip(source.snapshots, source.snapshots[1:])]
    return {
        "source": {"path": source.path, "kind": source.kind, "graph": label, "pipeline": source.pipeline,
                   "flops_at": source.flops_at},
        "inputs": view["inputs"], "outputs": view["outputs"], "num_parameters": view["num_parameters"],
        "layers": analysis.layer_table(view), "totals": analysis.totals(view),
        "groups": [{"key": key, "layer": layer, "nodes": [_node_row(n) for n in nodes]}
                   for key, layer, nodes in analysis.groups(view)],
        "report": source.report, "passes": passes, "diff": diff,
    }


def _embed(data: dict) -> str:
    # Escaped so that no string in the data can close the script tag; JSON.parse reads \u003c back as '<'.
    text = json.dumps(data, default=str, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def render_html(source: Source, label: str, view: dict, diff: dict | None = None) -> str:
    title = html.escape(f"prunus dump: {source.path} ({label})")
    return _PAGE.format(title=title, css=_CSS, js=_JS, data=_embed(page_data(source, label, view, diff)),
                        kernels=_kernels_html(source))


def _kernels_html(source: Source) -> str:
    """The generated Triton kernels of an artifact, one collapsible source listing each."""
    if not source.kernels:
        return ""
    items = "".join(f"<details><summary>kernels/{html.escape(name)}</summary><pre>{html.escape(text)}</pre></details>"
                    for name, text in source.kernels)
    return f'<section id="kernels-section"><h2>Generated kernels ({len(source.kernels)})</h2>{items}</section>'



_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
  <h1>prunus dump</h1>
  <div id="meta"></div>
</header>
<main>
  <section id="diff-section" hidden><h2>Diff</h2><div id="diff"></div></section>
  <section id="layers-section"><h2>Per layer</h2><div id="layers"></div></section>
  <section id="graph-section">
    <h2>Graph</h2>
    <div class="toolbar">
      <input id="search" type="search" placeholder="filter ops by op name or module path (e.g. q_proj, aten.linear)"
             autocomplete="off" spellcheck="false">
      <span id="match-count" aria-live="polite"></span>
      <button type="button" id="expand-all">expand all</button>
      <button type="button" id="collapse-all">collapse all</button>
    </div>
    <div id="groups"></div>
  </section>
  <section id="report-section" hidden><h2>Pass report</h2><div id="report"></div></section>
  <section id="passes-section" hidden><h2>Changes per pass</h2><div id="passes"></div></section>
  {kernels}
</main>
<script type="application/json" id="prunus-data">{data}</script>
<script>{js}</script>
</body>
</html>
"""

_CSS = """
:root { --fg: #1d232b; --muted: #5f6b7a; --line: #dde3ea; --bg: #fff; --head: #f3f6f9; --add: #e7f6ea;
        --del: #fdecec; --chg: #fff6dd; --accent: #2a5db0; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header { padding: 14px 24px; border-bottom: 1px solid var(--line); background: var(--head); }
h1 { margin: 0 0 4px; font-size: 20px; }
h2 { font-size: 16px; margin: 22px 0 8px; }
main { padding: 0 24px 40px; }
#meta { color: var(--muted); }
#meta b { color: var(--fg); font-weight: 600; }
[hidden] { display: none !important; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono, table.ops td { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
.toolbar { display: flex; gap: 10px; align-items: center; margin-bottom: 8px; position: sticky; top: 0;
           background: var(--bg); padding: 6px 0; z-index: 2; }
#search { flex: 0 1 480px; padding: 5px 8px; border: 1px solid var(--line); border-radius: 6px; font-size: 14px; }
#match-count { color: var(--muted); min-width: 12em; }
button { font: inherit; padding: 3px 10px; border: 1px solid var(--line); border-radius: 6px; background: var(--head);
         cursor: pointer; }
details { border: 1px solid var(--line); border-radius: 6px; margin: 4px 0; }
details > summary { cursor: pointer; padding: 5px 10px; background: var(--head); border-radius: 6px; }
details[open] > summary { border-bottom: 1px solid var(--line); border-radius: 6px 6px 0 0; }
details > .body { padding: 6px 10px; overflow-x: auto; }
.gname { font-weight: 600; font-family: ui-monospace, Menlo, Consolas, monospace; }
.gstats, .gmatch { color: var(--muted); margin-left: 8px; }
.gmatch { color: var(--accent); }
table.ops td.args { color: var(--muted); max-width: 48em; overflow-wrap: anywhere; }
tr.added td { background: var(--add); } tr.removed td { background: var(--del); } tr.changed td { background: var(--chg); }
.sig { display: block; white-space: pre-wrap; overflow-wrap: anywhere; }
.sig.minus { color: #9b1c1c; } .sig.plus { color: #17602a; }
.muted { color: var(--muted); }
"""

_JS = r"""
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("prunus-data").textContent);
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) =>
    ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const num = (n) => (n === null || n === undefined) ? "–" : Number(n).toLocaleString("en-US");
  const signed = (n) => (n > 0 ? "+" : "") + num(n);
  const delta = (a, b) => a === b ? num(b) : `${num(a)} → ${num(b)} (${signed(b - a)})`;
  const table = (cls, head, rows) => `<table class="${cls}"><thead><tr>${head.map(([h, n]) =>
    `<th${n ? ' class="n"' : ""}>${esc(h)}</th>`).join("")}</tr></thead><tbody>${rows.join("")}</tbody></table>`;
  const cells = (values, numeric) => values.map((v, i) =>
    `<td${numeric[i] ? ' class="n"' : ""}>${esc(v)}</td>`).join("");
  const groupTitle = (g) => g.layer === null ? g.key : `layer ${g.layer} · ${g.key}`;

  // header
  const src = data.source;
  $("meta").innerHTML = [
    `<b>${esc(src.path)}</b> (${esc(src.kind)}, graph <b>${esc(src.graph)}</b>)`,
    src.pipeline !== null ? `pipeline <b class="mono">${esc(src.pipeline || "(none)")}</b>` : "",
    `<b>${num(data.num_parameters)}</b> parameters`,
    `${num(data.totals.ops)} ops`, `${data.layers.filter((r) => r.layer !== null).length} layers`,
    `inputs ${data.inputs.map((i) => `<span class="mono">${esc(i.name)}: ${esc(i.type)}</span>`).join(", ")}`,
  ].filter(Boolean).join(" · ");

  // per-layer table
  const layerHead = [["layer"], ["module"], ["ops", 1], ["parameters", 1], [`FLOPs (${src.flops_at})`, 1],
                     ["KV bytes/token", 1]];
  const numeric6 = [0, 0, 1, 1, 1, 1];
  $("layers").innerHTML = table("layer-table", layerHead, data.layers.map((r) =>
    `<tr>${cells([r.layer === null ? "–" : r.layer, r.group, num(r.ops), num(r.parameters), num(r.flops),
                  num(r.kv_bytes_per_token)], numeric6)}</tr>`).concat([`<tr class="total">${cells(["total", "",
      num(data.totals.ops), num(data.totals.parameters), num(data.totals.flops),
      num(data.totals.kv_bytes_per_token)], numeric6)}</tr>`]));

  // graph, grouped by layer; every row is kept with its search text
  const groupsEl = $("groups");
  groupsEl.innerHTML = data.groups.map((g) => {
    const rows = g.nodes.map(([name, target, args, type, module, flops]) =>
      `<tr><td>${esc(name)}</td><td>${esc(target)}</td><td class="args">${esc(args)}</td><td>${esc(type)}</td>` +
      `<td>${esc(module)}</td><td class="n">${flops ? num(flops) : ""}</td></tr>`);
    const flops = g.nodes.reduce((s, n) => s + n[5], 0);
    return `<details class="group ${g.layer === null ? "other" : "layer"}" data-group="${esc(g.key)}">` +
      `<summary><span class="gname">${esc(groupTitle(g))}</span><span class="gstats">${g.nodes.length} ops` +
      `${flops ? " · " + num(flops) + " FLOPs" : ""}</span><span class="gmatch"></span></summary>` +
      `<div class="body">${table("ops", [["name"], ["op"], ["args"], ["type"], ["module"], ["FLOPs", 1]], rows)}` +
      `</div></details>`;
  }).join("");
  const details = [...groupsEl.querySelectorAll("details.group")];
  const index = details.map((d, gi) => [...d.querySelectorAll("tbody tr")].map((tr, ni) => {
    const n = data.groups[gi].nodes[ni];
    return {tr, text: (n[1] + " " + n[4]).toLowerCase()};
  }));
  const total = data.totals.ops;
  let openBeforeSearch = null;
  function filter() {
    const q = $("search").value.trim().toLowerCase();
    if (q && openBeforeSearch === null) openBeforeSearch = details.map((d) => d.open);
    let matches = 0;
    details.forEach((d, gi) => {
      let n = 0;
      for (const row of index[gi]) {
        const hit = !q || row.text.includes(q);
        row.tr.hidden = !hit;
        if (hit) n++;
      }
      matches += n;
      d.hidden = q !== "" && n === 0;
      if (q) d.open = n > 0;
      d.querySelector(".gmatch").textContent = q ? `${n} match${n === 1 ? "" : "es"}` : "";
    });
    if (!q && openBeforeSearch !== null) {
      details.forEach((d, i) => { d.open = openBeforeSearch[i]; });
      openBeforeSearch = null;
    }
    $("match-count").textContent = q ? `${matches} of ${total} ops match` : `${total} ops`;
  }
  $("search").addEventListener("input", filter);
  $("expand-all").addEventListener("click", () => details.forEach((d) => { if (!d.hidden) d.open = true; }));
  $("collapse-all").addEventListener("click", () => details.forEach((d) => { d.open = false; }));
  filter();

  // report
  if (data.report.length) {
    $("report-section").hidden = false;
    const verification = (v) => Object.entries(v || {}).filter(([, x]) => typeof x === "number")
      .map(([k, x]) => `${k}=${x.toPrecision(3)}`).join(", ");
    $("report").innerHTML = table("report", [["pass"], ["kind"], ["seconds", 1], ["parameters", 1],
        ["FLOPs/token", 1], ["KV bytes/token", 1], ["verification"], ["notes"]],
      data.report.map((r) => `<tr>${cells([r.spec, r.kind, Number(r.seconds).toFixed(2),
        delta(r.params_before, r.params_after), delta(r.flops_before, r.flops_after),
        delta(r.kv_bytes_before, r.kv_bytes_after), verification(r.verification), (r.notes || []).join("; ")],
        [0, 0, 1, 1, 1, 1, 0, 0])}</tr>`));
  }

  // diffs: a summary line each, the tables only once opened
  const diffSummary = (d) => {
    const t = d.totals, c = d.count;
    return [`${c.added || 0} added`, `${c.removed || 0} removed`, `${c.changed || 0} changed`,
      `ops ${delta(t.before.ops, t.after.ops)}`, `parameters ${delta(t.before.parameters, t.after.parameters)}`,
      `FLOPs ${delta(t.before.flops, t.after.flops)}`].join(" · ");
  };
  const sigs = (counts, cls, mark) => Object.entries(counts).map(([s, n]) =>
    `<span class="sig ${cls}">${mark} ${n > 1 ? n + " × " : ""}${esc(s)}</span>`).join("");
  function diffBody(d) {
    const layers = d.layers.filter((r) => r.ops_before !== r.ops_after || r.parameters_before !== r.parameters_after
                                          || r.flops_before !== r.flops_after);
    const layerRows = layers.map((r) => `<tr>${cells([r.layer === null ? "–" : r.layer, r.group,
      delta(r.ops_before, r.ops_after), delta(r.parameters_before, r.parameters_after),
      delta(r.flops_before, r.flops_after)], [0, 0, 1, 1, 1])}</tr>`);
    const opRows = d.ops.map((c) => `<tr class="${c.status}"><td>${esc(c.status)}</td><td>${esc(c.module || "<top>")}` +
      `</td><td>${esc(c.target)}</td><td class="n">${c.before}</td><td class="n">${c.after}</td><td>` +
      sigs(c.removed, "minus", "−") + sigs(c.added, "plus", "+") + `</td></tr>`);
    return (layerRows.length ? table("diff-layers", [["layer"], ["module"], ["ops", 1], ["parameters", 1],
        ["FLOPs", 1]], layerRows) : `<p class="muted">no per-layer change in ops, parameters or FLOPs</p>`) +
      (opRows.length ? table("diff-ops", [["change"], ["module"], ["op"], ["before", 1], ["after", 1],
        ["signatures"]], opRows) : `<p class="muted">no op changed</p>`);
  }
  function diffSection(d, title, open) {
    const el = document.createElement("details");
    el.className = "diff";
    el.innerHTML = `<summary><span class="gname">${esc(title)}</span><span class="gstats">${esc(diffSummary(d))}` +
      `</span></summary><div class="body"></div>`;
    const body = el.querySelector(".body");
    el.addEventListener("toggle", () => { if (el.open && !body.childElementCount) body.innerHTML = diffBody(d); });
    el.open = open;
    return el;
  }
  if (data.passes.length) {
    $("passes-section").hidden = false;
    data.passes.forEach((p) => $("passes").appendChild(diffSection(p, `${p.before} → ${p.after}`, false)));
  }
  if (data.diff) {
    $("diff-section").hidden = false;
    $("diff").appendChild(diffSection(data.diff, `${data.diff.before} → ${data.diff.after}`, true));
  }
})();
"""
