"""The fuse pass: generated kernels (run by the Triton interpreter) reproduce the unfused graph; regions, errors,
artifacts, dump and ONNX."""
import os

import pytest
import torch
import torch.nn.functional as F

import prunus
from prunus.codegen.triton import PATTERNS, classify, fused_nodes, get_kernel, partition
from tests.conftest import main_output

aten = torch.ops.aten


def _fuse(model, inputs, spec="fuse"):
    return prunus.optimize(model, spec, example_inputs=inputs)


def _kernels(opt):
    return {get_kernel(n.args[1]).meta["pattern"] for n in fused_nodes(opt.graph.gm)}


# ---- one module per pattern, written as Hugging Face writes it (float32: the interpreter's bf16 is wrong) ----

class RMSNorm(torch.nn.Module):
    def __init__(self, n=32):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


class AddNorm(RMSNorm):
    def forward(self, x, residual):
        h = x + residual
        return h, super().forward(h)


class LayerNorm(torch.nn.Module):
    def __init__(self, n=32):
        super().__init__()
        self.norm = torch.nn.LayerNorm(n)
        torch.nn.init.normal_(self.norm.weight)
        torch.nn.init.normal_(self.norm.bias)

    def forward(self, x):
        return self.norm(x)


class SwiGLU(torch.nn.Module):
    def forward(self, gate, up):
        return F.silu(gate) * up


class GeluBias(torch.nn.Module):
    def __init__(self, n=48, approximate="tanh"):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(n))
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x + self.bias, approximate=self.approximate)


class Rope(torch.nn.Module):
    def forward(self, q, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        half = q.shape[-1] // 2
        rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
        return q * cos + rotated * sin


class Softmax(torch.nn.Module):
    def forward(self, scores, mask):
        return F.softmax(scores + mask, dim=-1)


def _cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    mask = torch.zeros(2, 1, 6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    return {
        "rmsnorm": (RMSNorm(), (r(2, 5, 32),)),
        "layernorm": (LayerNorm(), (r(2, 5, 32),)),
        "add_norm": (AddNorm(), (r(2, 5, 32), r(2, 5, 32))),
        "swiglu": (SwiGLU(), (r(2, 5, 48), r(2, 5, 48))),
        "gelu": (GeluBias(), (r(2, 5, 48),)),
        "rope": (Rope(), (r(2, 3, 5, 16).transpose(1, 2).contiguous().transpose(1, 2), r(2, 5, 16), r(2, 5, 16))),
        "softmax": (Softmax(), (r(2, 3, 6, 6), mask)),
    }


@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p != "elementwise"])
def test_each_pattern_fuses_into_one_kernel_and_matches(pattern):
    model, inputs = _cases()[pattern]
    opt = _fuse(model, inputs)
    calls = fused_nodes(opt.graph.gm)
    assert len(calls) == 1 and _kernels(opt) == {pattern}
    compute = [n for n in opt.graph.graph.nodes if n.op == "call_function"
               and n.target not in (torch.ops.prunus.fused.default,) and "getitem" not in str(n.target)
               and n.target not in (aten.unsqueeze.default, aten.transpose.int, aten._assert_tensor_metadata.default)]
    assert compute == []  # every op of the pattern went into the kernel
    with torch.no_grad():
        ref = model(*inputs)
    got = opt(*inputs)
    for a, b in zip(ref if isinstance(ref, tuple) else (ref,), got if isinstance(got, tuple) else (got,)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert opt.report[-1].kind == "exact" and opt.report[-1].verification["max_abs_error"] < 1e-4
    # every load before the first computation (LayerNorm's weight and bias not behind its reductions)
    lines = [line.strip() for line in get_kernel(calls[0].args[1]).source.split("def kernel(")[1].splitlines()]
    values = [line for line in lines if line.startswith("v")]
    loads = [i for i, line in enumerate(values) if "tl.load(" in line.split(" = ", 1)[1][:8]]
    assert loads == list(range(len(loads)))


class ScaledScores(torch.nn.Module):
    def forward(self, x):
        scores = torch.matmul(x, x.transpose(1, 2))  # [batch, seq, seq]: the softmax row width is symbolic
        return F.softmax(scores * 0.25, dim=-1)


def test_generated_kernel_handles_other_shapes_than_captured():
    model = ScaledScores()
    opt = _fuse(model, (torch.randn(2, 6, 8),))
    assert _kernels(opt) == {"softmax"}
    for shape in ((3, 9, 8), (1, 1, 8), (2, 33, 8)):  # other batch, other (and wider than a block) row width
        x = torch.randn(*shape)
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


def test_rows_wider_than_a_program_in_row_major_program_order(monkeypatch):
    """Rows wider than a program: one row a program, the column blocks on grid axis 0 and the row blocks on axes 1
    and 2 (here at most 2 on axis 1: 3 row blocks over 2 x 2, one program past the last row); a partial last
    column block. A module generated before (rows on axis 0, column blocks on axis 1) still runs."""
    from prunus.codegen.triton import runtime

    g = torch.Generator().manual_seed(4)
    gate, up = torch.randn(3, 1100, generator=g), torch.randn(3, 1100, generator=g)  # 1024 + 76 columns
    opt = _fuse(SwiGLU(), (gate, up))
    kernel = get_kernel(fused_nodes(opt.graph.gm)[0].args[1])
    assert kernel.meta["flat"] and "cb = tl.program_id(0)" in kernel.source
    assert runtime.launch_shape(False, 1100, 3, True) == (runtime.WIDE_BLOCK, 1, runtime.WIDE_WARPS)
    grids = []
    real = kernel.module.kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]
    monkeypatch.setattr(kernel.module, "kernel", Spy())
    monkeypatch.setattr(runtime, "MAX_GRID_Y", 2)
    torch.testing.assert_close(opt(gate, up), F.silu(gate) * up, rtol=1e-5, atol=1e-5)
    assert grids == [(2, 2, 2)]
    monkeypatch.undo()
    old = kernel.source.replace(", 'flat': True", "").replace(
        "    cb = tl.program_id(0)\n    pid = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)",
        "    pid = tl.program_id(0)").replace("cols = (cb * BLOCK", "cols = (tl.program_id(1) * BLOCK")
    assert "flat" not in old and "cb" not in old
    legacy = runtime.Kernel("legacy" + kernel.key, old)
    torch.testing.assert_close(legacy([gate, up])[0], F.silu(gate) * up, rtol=1e-5, atol=1e-5)


def test_gelu_exact_and_bert_style_post_norm():
    model = GeluBias(approximate="none")
    x = torch.randn(2, 5, 48)
    opt = _fuse(model, (x,))
    assert _kernels(opt) == {"gelu"}
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,expected", [
    ("llama", {"rmsnorm", "add_norm", "rope", "swiglu"}),
    ("gpt2", {"layernorm", "gelu"}),
    ("bert", {"layernorm"}),
])
def test_tiny_models_fused_match_unfused(tiny_models, arch, expected):
    model, inputs = tiny_models(arch)
    opt = _fuse(model, inputs, "dce, fuse")
    assert expected <= _kernels(opt)
    with torch.no_grad():
        ref = main_output(model(*inputs))
    torch.testing.assert_close(main_output(opt(*inputs)), ref, rtol=1e-4, atol=1e-4)


def test_partition_regions_of_a_llama_layer(cleaned):
    gm = cleaned("llama").graph.gm
    regions = partition(gm)
    by_pattern = {}
    for r in regions:
        by_pattern.setdefault(classify(r), []).append(r)
    # RoPE of q and of k in each of the 2 layers: rotate_half (slice, neg, cat) and both products in one region
    ropes = by_pattern["rope"]
    assert len(ropes) == 4
    for r in ropes:
        targets = [n.target for n in r.nodes]
        assert targets.count(aten.slice.Tensor) == 2 and aten.neg.default in targets and aten.cat.default in targets
        assert len(r.outputs) == 1 and r.outputs[0].users  # the rotated q (or k) feeds attention
    # SwiGLU: silu(gate) * up, nothing else, with the two projections as inputs
    for r in by_pattern["swiglu"]:
        assert [n.target for n in r.nodes] == [aten.silu.default, aten.mul.Tensor]
        assert all(i.target is aten.linear.default for i in r.inputs)
    # the residual add joins the RMSNorm after it, and both the sum and the normalized value leave the region
    for r in by_pattern["add_norm"]:
        assert r.nodes[0].target is aten.add.Tensor and aten.mean.dim in {n.target for n in r.nodes}
        assert len(r.outputs) == 2
    # no region holds a matmul, attention or view, and no node sits in two regions
    seen = set()
    for r in regions:
        assert not seen & set(r.nodes)
        seen |= set(r.nodes)
        assert not {n.target for n in r.nodes} & {aten.linear.default, aten.scaled_dot_product_attention.default,
                                                   aten.view.default, aten.transpose.int}


def test_patterns_param_selects_regions(tiny_models):
    model, inputs = tiny_models("llama")
    opt = _fuse(model, inputs, "dce, fuse(patterns=[swiglu, rope])")
    assert _kernels(opt) == {"swiglu", "rope"}
    assert any(n.target is aten.mean.dim for n in opt.graph.graph.nodes)  # the norms stayed unfused


def test_errors_unknown_pattern_and_backend():
    with pytest.raises(prunus.SpecError, match="patterns"):
        prunus.passes.build_pipeline("fuse(patterns=[rmsnorm, flashy])")
    with pytest.raises(prunus.SpecError, match="backend"):
        prunus.passes.build_pipeline("fuse(backend=cuda)")
    with pytest.raises(prunus.SpecError):
        prunus.passes.build_pipeline("fuse(patterns=[])")
    assert "fuse" in prunus.passes.registry()


def test_identical_regions_share_one_kernel(tiny_models):
    model, inputs = tiny_models("bert")
    opt = _fuse(model, inputs, "dce, fuse")
    keys = [n.args[1] for n in fused_nodes(opt.graph.gm)]
    assert len(keys) > len(set(keys))  # the layers' post-attention norms are one generated kernel


def test_save_load_dump_and_onnx(tiny_models, tmp_path, monkeypatch):
    model, inputs = tiny_models("llama")
    opt = _fuse(model, inputs, "dce, fuse")
    out = opt.save(str(tmp_path / "art"))
    kernels = sorted(os.listdir(os.path.join(out, "kernels")))
    keys = sorted({n.args[1] for n in fused_nodes(opt.graph.gm)})
    assert kernels == [f"{k}.py" for k in keys]
    source = open(os.path.join(out, "kernels", kernels[0])).read()
    assert "@triton.jit" in source and "def reference(" in source

    # a fresh cache and no registered kernels: load rebuilds them from the artifact's sources
    from prunus.codegen.triton import runtime
    monkeypatch.setenv("PRUNUS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "_KERNELS", {})
    loaded = prunus.load(out)
    assert fused_nodes(loaded.graph.gm)
    with torch.no_grad():
        ref = main_output(model(*inputs))
    torch.testing.assert_close(main_output(loaded(*inputs)), ref, rtol=1e-4, atol=1e-4)
    # without the interpreter the fused calls run their reference ops (a machine without a GPU)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.testing.assert_close(main_output(loaded(*inputs)), ref, rtol=1e-4, atol=1e-4)

    from prunus.dump import dump
    text = dump(out, "text")
    assert "@triton.jit" in text and kernels[0].removesuffix(".py") in text
    page = dump(out, "html")
    assert "tl.load" in page and kernels[0].removesuffix(".py") in page

    # ONNX: the fused calls are exported as the ops they came from
    path = opt.export_onnx(str(tmp_path / "model.onnx"))
    import onnx
    op_types = {n.op_type for n in onnx.load(path).graph.node}
    assert not any("fused" in t for t in op_types) and {"Neg", "Concat"} <= op_types


@pytest.mark.parametrize("pattern", ["rope", "swiglu", "add_norm"])
def test_bf16_rounding_is_bit_exact(pattern):
    # bf16 values are rounded through their bits in the kernel, so the interpreter reproduces eager exactly
    model, inputs = _cases()[pattern]
    model = model.to(torch.bfloat16)
    inputs = tuple(x.to(torch.bfloat16) for x in inputs)
    opt = _fuse(model, inputs)
    assert opt.report[-1].kind == "lossy"  # narrow graphs report fidelity rather than a float tolerance
    with torch.no_grad():
        ref = model(*inputs)
    got = opt(*inputs)
    for a, b in zip(ref if isinstance(ref, tuple) else (ref,), got if isinstance(got, tuple) else (got,)):
        assert torch.equal(a, b)


def test_kv_cache_then_fuse_decodes_through_generated_kernels(tiny_models):
    """`kv_cache, fuse`: the KV graphs, built from the fused graph, run the generated kernels in prefill and
    decode, and greedy decoding is still the original model's."""
    from prunus.passes.kv.runtime import kv_graphs

    model, x = tiny_models("llama")
    opt = prunus.optimize(model, "kv_cache, fuse", example_inputs=x)
    graphs, _ = kv_graphs(opt.graph, opt.graph.kv)
    fused = torch.ops.prunus.fused.default
    for gm in (graphs.prefill, graphs.decode):
        assert sum(n.target == fused for n in gm.graph.nodes) == len(fused_nodes(opt.graph.gm))
    assert any(n.target == torch.ops.prunus.decode_attention.default for n in graphs.decode.graph.nodes)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(prunus.generate(opt, ids, 5), prunus.generate(model, ids, 5))


class RopeQK(torch.nn.Module):  # transformers' apply_rotary_pos_emb: q and k (fewer heads, GQA) share cos and sin
    def forward(self, q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

        def rotate(x):
            half = x.shape[-1] // 2
            return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


def test_sibling_regions_launch_as_one_kernel(tiny_models):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)
    cos, sin = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    model = RopeQK()
    opt = _fuse(model, (q, k, cos, sin))
    calls = fused_nodes(opt.graph.gm)
    assert len(calls) == 1  # q (4 heads) and k (2 heads): one launch, two parts with their own rows
    kernel = get_kernel(calls[0].args[1])
    assert [p["rank"] for p in kernel.meta["parts"]] == [3, 3] and kernel.source.count("def part") == 1
    assert any("1 groups of sibling regions" in n for n in opt.report[-1].notes)
    for shape_q, shape_k, n in (((2, 4, 5, 16), (2, 2, 5, 16), 5), ((3, 8, 7, 16), (3, 1, 7, 16), 7)):
        q, k = torch.randn(*shape_q, generator=g), torch.randn(*shape_k, generator=g)
        cos, sin = torch.randn(shape_q[0], n, 16, generator=g), torch.randn(shape_q[0], n, 16, generator=g)
        for a, b in zip(model(q, k, cos, sin), opt(q, k, cos, sin)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    single = _fuse(model, (q, k, cos, sin), "fuse(group=false)")
    assert len(fused_nodes(single.graph.gm)) == 2

    # a llama: RoPE of q and k in each layer is one group; layers (which read the same cos and sin) stay apart
    model, inputs = tiny_models("llama")
    opt = _fuse(model, inputs, "dce, fuse")
    ropes = [n for n in fused_nodes(opt.graph.gm) if get_kernel(n.args[1]).meta["pattern"] == "rope"]
    assert len(ropes) == model.config.num_hidden_layers
    assert all(len(get_kernel(n.args[1]).meta["parts"]) == 2 for n in ropes)
    with torch.no_grad():
        ref = main_output(model(*inputs))
    torch.testing.assert_close(main_output(opt(*inputs)), ref, rtol=1e-4, atol=1e-4)


def test_launch_shape_candidates(monkeypatch):
    from prunus.codegen.triton import runtime
    from prunus.codegen.triton.runtime import candidates, launch_shape

    # RoPE prefill: 128-wide rows, 16 per program by default (4 warps); half and twice the rows, other warps
    assert launch_shape(False, 128, 65536, True) == (128, 16, 4)
    assert candidates(16, 4, 128, 65536) == [(16, 4), (8, 4), (32, 8), (16, 2), (16, 8)]
    # one 4096-wide row (decode norm): no other row count fits; 8 warps by default, also 4 and 16
    assert launch_shape(True, 4096, 1, True) == (4096, 1, 8)
    assert candidates(1, 8, 4096, 1) == [(1, 8), (1, 4), (1, 16)]
    # a tile never exceeds 16K elements
    assert all(r * 8192 <= 16384 for r, _ in candidates(2, 4, 8192, 64))
    # rows wider than a program: the default the tuner starts from is launch_shape's, warps included
    monkeypatch.setattr(runtime, "WIDE_WARPS", 2)
    block, rb, warps = launch_shape(False, 14336, 2048, True)
    assert (block, rb, warps) == (runtime.WIDE_BLOCK, 1, 2) and candidates(rb, warps, block, 2048)[0] == (1, 2)
    assert launch_shape(False, 14336, 2048, False) == (1024, 2, 4)  # a module from before "flat": as it was


class TwoSoftmaxes(torch.nn.Module):  # row reductions in both parts, rows of different counts, a shared mask
    def forward(self, a, b, mask):
        return F.softmax(a + mask, dim=-1), F.softmax(b * 0.5 + mask, dim=-1)


def test_sibling_reductions_launch_as_one_kernel():
    g = torch.Generator().manual_seed(2)
    mask = torch.zeros(2, 1, 6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    a, b = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 2, 6, 6, generator=g)
    model = TwoSoftmaxes()
    opt = _fuse(model, (a, b, mask))
    calls = fused_nodes(opt.graph.gm)
    assert len(calls) == 1 and all(p["reduction"] for p in get_kernel(calls[0].args[1]).meta["parts"])
    assert get_kernel(calls[0].args[1]).source.count("def part") == 2  # different code: two functions
    for x in ((a, b, mask), (torch.randn(2, 8, 6, 6, generator=g), torch.randn(2, 1, 6, 6, generator=g), mask)):
        for want, got in zip(model(*x), opt(*x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_64_bit_indexing_only_past_2_31_and_both_match(monkeypatch):
    from prunus.codegen.triton import runtime

    small = torch.empty(4, 8, device="meta")
    assert not runtime._spans_2_31([small], [small])
    assert not runtime._spans_2_31([torch.empty(2**15, 2**15, device="meta")], [small])  # last offset 2^30 - 1
    assert runtime._spans_2_31([torch.empty(2**15 + 1, 2**15, device="meta")], [small])
    assert runtime._spans_2_31([small], [torch.empty(2, 2**30, device="meta")])
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)
    cos, sin = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    model = RopeQK()
    opt = _fuse(model, (q, k, cos, sin))  # rank-3 rows (batch, head, position): two divisions per row
    source = get_kernel(fused_nodes(opt.graph.gm)[0].args[1]).source
    assert "pid.to(tl.int64)" in source and "q2 = rest // L2" in source
    ref = model(q, k, cos, sin)
    for wide in (False, True):
        monkeypatch.setattr(runtime, "_spans_2_31", lambda inputs, outs, wide=wide: wide)
        for a, b in zip(ref, opt(q, k, cos, sin)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_one_boolean_attention_mask_converted_once_for_every_layer(tiny_models):
    """share_masks: the layers' attention calls read one additive mask, aligned for the memory-efficient kernel
    (no per-call conversion or padding), with the same values SDPA makes itself: outputs equal to the bit."""
    model, inputs = tiny_models("llama")
    opt = _fuse(model, inputs, "dce, fuse")
    plain = _fuse(model, inputs, "dce, fuse(share_masks=false)")
    assert any("mask(s) converted once" in note for r in opt.report if r.name == "fuse" for note in r.notes)
    gm = opt.graph.gm
    calls = [n for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    masks = {n.args[3] for n in calls}
    assert len(calls) >= 2 and len(masks) == 1
    assert sum(n.target is aten.where.ScalarSelf for n in gm.graph.nodes) == 1
    seen = []  # the masks the attention calls receive
    original = aten.scaled_dot_product_attention.default

    def spy(*args, **kwargs):
        seen.append(args[3])
        return original(*args, **kwargs)

    for length in (5, 8):  # 8: a row length that is already a multiple of the alignment
        ids = torch.randint(0, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
        seen.clear()
        for n in calls:
            n.target = spy
        gm.recompile()
        with torch.no_grad():
            got = opt.graph.gm(ids)[0]
        for n in calls:
            n.target = original
        gm.recompile()
        assert len(seen) == len(calls) and all(m.dtype == torch.float32 for m in seen)
        assert all(s % 8 == 0 for m in seen for s in m.stride()[:-1]) and seen[0].stride(-1) == 1
        assert seen[0].isneginf().any() and set(seen[0].unique().tolist()) == {0.0, float("-inf")}
        with torch.no_grad():
            assert torch.equal(got, plain.graph.gm(ids)[0])


def test_sibling_linears_run_as_one_matmul(tiny_models):
    """q/k/v and gate/up of each layer: one linear over the concatenated weights, split after; same outputs,
    same parameter count, the separate weights gone from the graph, the user's model untouched."""
    model, inputs = tiny_models("llama")
    q_weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    opt = _fuse(model, inputs, "dce, fuse")
    plain = _fuse(model, inputs, "dce, fuse(merge_linears=false)")
    layers = model.config.num_hidden_layers
    notes = [note for r in opt.report if r.name == "fuse" for note in r.notes]
    assert f"{3 * layers} linears merged into the matmul of a sibling that reads the same input" in notes
    gm = opt.graph.gm
    linears = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    assert len(linears) == len([n for n in plain.graph.gm.graph.nodes if n.target is aten.linear.default]) - 3 * layers
    splits = [n for n in gm.graph.nodes if n.target is aten.split_with_sizes.default]
    attn = model.config
    head = attn.hidden_size // attn.num_attention_heads
    assert sorted(tuple(n.args[1]) for n in splits) == sorted(
        [(attn.hidden_size, attn.num_key_value_heads * head, attn.num_key_value_heads * head)] * layers
        + [(attn.intermediate_size, attn.intermediate_size)] * layers)
    names = dict(gm.named_parameters())
    assert "model_layers_0_self_attn_merged_weight" in names and "model_layers_0_mlp_merged_weight" in names
    assert not any("q_proj" in name or "gate_proj" in name for name in names)
    merged = names["model_layers_0_self_attn_merged_weight"]
    assert torch.equal(merged[:attn.hidden_size], q_weight)
    assert opt.report[-1].params_after == plain.report[-1].params_after
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_weight)
    with torch.no_grad():
        torch.testing.assert_close(main_output(opt(*inputs)), main_output(plain(*inputs)), rtol=1e-5, atol=1e-5)


class _Siblings(torch.nn.Module):
    """Three linears on one input: a and b with biases, c without; c's weight also read by a matmul (tied)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 8), torch.nn.Linear(16, 24)
        self.c, self.d = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 4, bias=False)

    def forward(self, x):
        return self.a(x) * 2, self.b(x) + 1, self.c(x) @ self.c.weight, self.d(x) - 1


def test_sibling_linears_with_biases_and_a_shared_weight():
    """a and b (both with a bias) merge, bias concatenated too; c (its weight read elsewhere) stays, so d, the
    one bias-free linear left, has no sibling."""
    torch.manual_seed(0)
    model, x = _Siblings(), (torch.randn(2, 3, 16),)
    opt = _fuse(model, x, "fuse(patterns=[elementwise])")
    gm = opt.graph.gm
    merged = [n for n in gm.graph.nodes if n.target is aten.linear.default and "merged" in str(n.args[1])]
    assert len(merged) == 1 and len(merged[0].args) == 3
    assert [list(n.args[1]) for n in gm.graph.nodes if n.target is aten.split_with_sizes.default] == [[8, 24]]
    assert any(n.op == "get_attr" and n.target == "c.weight" for n in gm.graph.nodes)
    with torch.no_grad():
        for got, ref in zip(opt(*x), model(*x), strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
