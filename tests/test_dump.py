"""`prunus dump`: every format on an artifact, a .pt2 and an .onnx file, `after`, `diff`, the typed errors,
and the HTML page driven in a real browser (Debian's chromium through Playwright)."""
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from types import SimpleNamespace

import pytest

import prunus
from prunus.dump import dump
from prunus.ir.graph import layer_index
from prunus.models import example_inputs, tiny

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def built(cleaned, tmp_path_factory):
    """The clean-up pipeline on tiny llama saved as an artifact and as ONNX, and a narrower llama to diff with."""
    root = tmp_path_factory.mktemp("dump")
    opt = cleaned("llama")
    art = opt.save(str(root / "art"))
    onnx_path = opt.export_onnx(str(root / "model.onnx"), check=False)
    narrow_model = tiny("llama", intermediate_size=96)
    narrow = prunus.optimize(narrow_model, "dce", example_inputs=example_inputs(narrow_model), verify=False)
    return SimpleNamespace(opt=opt, art=art, onnx=onnx_path, pt2=os.path.join(art, "program.pt2"),
                           narrow=narrow.save(str(root / "narrow")))


def _layer_rows(text: str) -> dict[str, list[str]]:
    """Rows of the rich per-layer table, module -> cells, plus 'total'."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 6 and (re.fullmatch(r"model\.layers\.\d+", cells[1]) or cells[1] == "(outside layers)"
                                or cells[0] == "total"):
            rows[cells[1] if cells[0] != "total" else "total"] = cells
    return rows


def _num(cell: str) -> int:
    return int(cell.replace(",", ""))


def _expected_params_per_layer(graph) -> Counter:
    out = Counter()
    for name, _, _, numel in graph.param_table():
        i = layer_index(name)
        out["(outside layers)" if i is None else f"model.layers.{i}"] += numel
    return out


def _sdpa(view: dict) -> list[dict]:
    return [n for n in view["nodes"] if n["target"] == "aten.scaled_dot_product_attention"]


# ---- text --------------------------------------------------------------------------------------
def test_text_has_ir_layer_table_and_report(built):
    out = dump(built.art)
    graph = built.opt.graph
    assert "# pipeline: dce, fold_constants, simplify_masks" in out
    assert re.search(r"^  \w+ = aten\.scaled_dot_product_attention\(.*\) : f32\[batch, 4, seq, 16\]$", out, re.M)
    assert "model.layers.1.self_attn.q_proj (Linear)" in out
    rows = _layer_rows(out)
    layers = [k for k in rows if k.startswith("model.layers.")]
    assert layers == ["model.layers.0", "model.layers.1"]
    expected = _expected_params_per_layer(graph)
    for module, cells in rows.items():
        if module != "total":
            assert _num(cells[3]) == expected[module], module
    assert sum(_num(rows[m][3]) for m in rows if m != "total") == graph.num_parameters()
    assert _num(rows["total"][3]) == graph.num_parameters()
    # KV cache per token and layer: K and V, 2 KV heads x head_dim 16, float32.
    assert [_num(rows[m][5]) for m in layers] == [2 * 2 * 16 * 4] * 2
    flops = sum(n["flops"] for n in built.opt.snapshots[-1][1]["nodes"])
    assert _num(rows["total"][4]) == flops
    for p in ("dce", "fold_constants", "simplify_masks"):
        assert re.search(rf"│ {p}\s+│ exact", out)


# ---- json and after= ---------------------------------------------------------------------------
def test_json_round_trips_the_view_and_report(built):
    data = json.loads(dump(built.art, "json"))
    label, snapshot = built.opt.snapshots[-1]
    assert data["nodes"] == json.loads(json.dumps(snapshot["nodes"], default=str))
    assert data["num_parameters"] == built.opt.graph.num_parameters()
    assert data["source"]["graph"] == label == "03_simplify_masks"
    assert data["source"]["snapshots"] == [s for s, _ in built.opt.snapshots]
    assert [r["name"] for r in data["report"]] == ["dce", "fold_constants", "simplify_masks"]
    assert sum(r["parameters"] for r in data["layers"]) == data["num_parameters"]
    assert json.loads(json.dumps(data)) == data


def test_after_selects_the_snapshot(built):
    captured = json.loads(dump(built.art, "json", after="captured"))
    assert captured["source"]["graph"] == "00_captured"
    assert all(len(n["args"]) == 4 and n["args"][3] != "None" for n in _sdpa(captured)), "captured SDPA has a mask"
    for after in ("simplify_masks", "03_simplify_masks"):
        simplified = json.loads(dump(built.art, "json", after=after))
        assert simplified["source"]["graph"] == "03_simplify_masks"
        assert all(n["args"][3:6] == ["None", "0", "True"] for n in _sdpa(simplified)), "mask replaced by is_causal"
    assert json.loads(dump(built.art, "json", after="dce"))["source"]["graph"] == "01_dce"
    assert "00_captured" in dump(built.art, after="captured").splitlines()[0]


# ---- dot and svg -------------------------------------------------------------------------------
def test_dot_is_a_digraph_with_one_cluster_per_layer(built):
    dot = dump(built.art, "dot")
    view = built.opt.snapshots[-1][1]
    assert dot.startswith("digraph prunus {") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    assert re.findall(r'subgraph cluster_\d+ \{\s*label="([^"]+)";', dot) == ["model.layers.0", "model.layers.1"]
    declared = set(re.findall(r"^\s*(n\d+) \[label=", dot, re.M))
    drawn = [n for n in view["nodes"] if n["op"] != "get_attr"]
    assert len(declared) == len(drawn)
    edges = re.findall(r"^\s*(n\d+) -> (n\d+);", dot, re.M)
    assert edges and all(a in declared and b in declared for a, b in edges)
    assert '[label="aten.linear\\nf32[batch, seq, 64]"]' in dot
    if shutil.which("dot"):
        assert subprocess.run(["dot", "-Tcanon"], input=dot.encode(), capture_output=True).returncode == 0


def test_svg_through_graphviz_or_a_clear_error(built, monkeypatch):
    if shutil.which("dot"):
        svg = dump(built.art, "svg")
        assert isinstance(svg, bytes) and b"<svg" in svg and b"model.layers.1" in svg
    monkeypatch.setattr("prunus.dump.dot.shutil.which", lambda name: None)
    with pytest.raises(prunus.ExportError, match=r"apt-get install graphviz.*--format dot or html"):
        dump(built.art, "svg")


# ---- .pt2 and .onnx ----------------------------------------------------------------------------
def test_pt2_file(built):
    data = json.loads(dump(built.pt2, "json"))
    assert data["source"]["kind"] == "pt2"
    assert data["num_parameters"] == built.opt.graph.num_parameters()
    assert data["inputs"] == [{"name": "input_ids", "type": "i64[batch, seq]"}]
    artifact = {r["group"]: r["parameters"] for r in json.loads(dump(built.art, "json"))["layers"]}
    assert {r["group"]: r["parameters"] for r in data["layers"]} == artifact
    assert len(_sdpa(data)) == 2
    assert set(_layer_rows(dump(built.pt2))) >= {"model.layers.0", "model.layers.1", "total"}


def test_onnx_file_grouped_by_module(built):
    data = json.loads(dump(built.onnx, "json"))
    assert data["source"]["kind"] == "onnx"
    assert data["inputs"] == [{"name": "input_ids", "type": "i64[batch, seq]"}]
    q_proj = [n for n in data["nodes"] if n["module"] == "model.layers.0.self_attn.q_proj"]
    assert [n["target"] for n in q_proj] == ["MatMul"]
    assert q_proj[0]["type"] == "f32[batch, seq, 64]" and q_proj[0]["flops"] == 2 * 64 * 64
    layers = [r for r in data["layers"] if r["layer"] is not None]
    assert [r["group"] for r in layers] == ["model.layers.0", "model.layers.1"]
    # Every projection weight (4 attention, 3 MLP) is counted in its layer.
    assert all(r["parameters"] >= 2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64 for r in layers)
    assert sum(r["parameters"] for r in data["layers"]) == data["num_parameters"]
    text = dump(built.onnx)
    assert "model.layers.0.self_attn.q_proj (Linear)" in text and "MatMul(" in text
    assert {"model.layers.0", "model.layers.1"} <= set(_layer_rows(text))


# ---- diff --------------------------------------------------------------------------------------
def test_diff_reports_changed_ops_and_layer_deltas(built):
    data = json.loads(dump(built.art, "json", diff=built.narrow))
    changes = {(c["module"], c["target"]): c for c in data["ops"]}
    gate = changes[("model.layers.0.mlp.gate_proj", "aten.linear")]
    assert gate["status"] == "changed" and (gate["before"], gate["after"]) == (1, 1)
    assert [s.rsplit(" : ", 1)[1] for s in gate["removed"]] == ["f32[batch, seq, 128]"]
    assert [s.rsplit(" : ", 1)[1] for s in gate["added"]] == ["f32[batch, seq, 96]"]
    # The narrow model kept its attention mask (only dce ran): the ops building it are added, and SDPA reads it.
    assert changes[("model.layers.1.self_attn", "aten.scaled_dot_product_attention")]["status"] == "changed"
    assert changes[("model", "aten.cumsum")]["status"] == "added"
    layers = {r["group"]: r for r in data["layers"]}
    mlp_delta = 3 * 64 * (128 - 96)
    for i in range(2):
        r = layers[f"model.layers.{i}"]
        assert r["parameters_before"] - r["parameters_after"] == mlp_delta
        assert r["flops_before"] > r["flops_after"]
    totals = data["totals"]
    assert totals["before"]["parameters"] - totals["after"]["parameters"] == 2 * mlp_delta
    text = dump(built.art, diff=built.narrow)
    assert "~ model.layers.0.mlp.gate_proj  aten.linear  1 -> 1" in text
    assert "    + aten.linear(%, %) : f32[batch, seq, 96]" in text
    assert json.loads(dump(built.art, "json", diff=built.art))["ops"] == []


# ---- errors ------------------------------------------------------------------------------------
def test_errors_are_typed(built, tmp_path):
    with pytest.raises(prunus.ArtifactError, match="does not exist"):
        dump(str(tmp_path / "missing"))
    with pytest.raises(prunus.SpecError, match="accepted: text, json, dot, svg, html"):
        dump(built.art, "pdf")
    with pytest.raises(prunus.SpecError, match="diff"):
        dump(built.art, "dot", diff=built.art)
    with pytest.raises(prunus.ArtifactError, match="available: 00_captured, 01_dce, 02_fold_constants"):
        dump(built.art, after="prune_heads")
    with pytest.raises(prunus.ArtifactError, match="--after needs an artifact directory"):
        dump(built.onnx, after="dce")
    with pytest.raises(prunus.ArtifactError, match="not a prunus artifact"):
        dump(str(tmp_path))
    for name, content in (("bad.pt2", b"not a zip"), ("bad.onnx", b"\x00garbage"), ("model.bin", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(prunus.ArtifactError):
            dump(str(tmp_path / name))
    broken = tmp_path / "broken"
    shutil.copytree(built.art, broken)
    (broken / "ir" / "01_dce.json").write_text("{")
    with pytest.raises(prunus.ArtifactError, match="01_dce.json is unreadable"):
        dump(str(broken))


# ---- html in a real browser --------------------------------------------------------------------
def test_html_is_self_contained_and_escaped(built, tmp_path):
    hostile = tmp_path / "a</script><b>"  # a path is data: it must neither end a script nor become markup
    shutil.copytree(built.art, hostile)
    page = dump(str(hostile), "html")
    assert page.startswith("<!doctype html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert page.count("</script>") == 2 and page.count("<script") == 2
    assert "a&lt;/script&gt;&lt;b&gt;" in page
    data = re.search(r'<script type="application/json" id="prunus-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data)["source"]["path"] == str(hostile)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: CI must install Debian's chromium to test the dump page")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); CI runs this test")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser, path):
    """A page at file://path, with a list of every request it made and every script error."""
    page = browser.new_page()
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(f"file://{path}")
    return page, requests, errors


def test_html_page_in_browser(browser, built, tmp_path):
    from playwright.sync_api import expect

    path = tmp_path / "dump.html"
    path.write_text(dump(built.art, "html"))
    view = built.opt.snapshots[-1][1]
    ops = [n for n in view["nodes"] if n["op"] not in ("placeholder", "get_attr", "output")]
    page, requests, errors = _open(browser, path)

    layers = page.locator("details.layer")
    expect(layers).to_have_count(2)
    expect(layers.locator(".gname")).to_have_text(["layer 0 · model.layers.0", "layer 1 · model.layers.1"])
    expect(page.locator("#groups tbody tr")).to_have_count(len(ops))
    expect(page.locator("#match-count")).to_have_text(f"{len(ops)} ops")

    first, first_row = layers.nth(0), layers.nth(0).locator("tbody tr").first
    expect(first_row).to_be_hidden()
    first.locator("summary").click()
    expect(first_row).to_be_visible()
    first.locator("summary").click()
    expect(first_row).to_be_hidden()

    visible = page.locator("#groups tbody tr:visible")
    q_proj = [n for n in ops if "q_proj" in n["module"] or "q_proj" in n["target"]]
    assert len(q_proj) == 2
    page.fill("#search", "q_proj")
    expect(page.locator("#match-count")).to_have_text(f"2 of {len(ops)} ops match")
    expect(visible).to_have_count(2)
    expect(visible.locator("td:nth-child(5)")).to_have_text(["model.layers.0.self_attn.q_proj",
                                                             "model.layers.1.self_attn.q_proj"])
    page.fill("#search", "aten.linear")
    expect(visible).to_have_count(sum(n["target"] == "aten.linear" for n in ops))
    page.fill("#search", "")
    expect(page.locator("#match-count")).to_have_text(f"{len(ops)} ops")
    expect(visible).to_have_count(0)  # every section closed again, as before the search

    expect(page.locator("#report")).to_contain_text("simplify_masks")
    passes = page.locator("#passes details.diff")
    expect(passes).to_have_count(len(built.opt.snapshots) - 1)
    last = passes.last
    expect(last.locator(".body *")).to_have_count(0)  # diff tables render only when opened
    last.locator("summary").click()
    sdpa = last.locator("tr.changed", has_text="aten.scaled_dot_product_attention")
    expect(sdpa).to_have_count(2)
    expect(sdpa.first).to_contain_text("None, 0, True")
    expect(last.locator("tr.removed").first).to_be_visible()
    assert requests == [f"file://{path}"] and errors == []


def test_html_diff_page_in_browser(browser, built, tmp_path):
    from playwright.sync_api import expect

    path = tmp_path / "diff.html"
    path.write_text(dump(built.art, "html", diff=built.narrow))
    page, _, errors = _open(browser, path)
    section = page.locator("#diff-section")
    expect(section).to_be_visible()
    row = section.locator("tr.changed", has_text="model.layers.0.mlp.gate_proj")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("f32[batch, seq, 96]")
    expect(section.locator("table.diff-layers")).to_contain_text("-6,144")
    assert errors == []
