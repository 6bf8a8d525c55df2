"""prune_mlp and prune_heads: the pruned graph against hand-pruned Hugging Face models and against the
original with the removed channels zeroed, on every tiny architecture; criteria, allocation, FLAP's bias
compensation, save/load and ONNX, and the errors."""
import copy
import math

import numpy as np
import pytest
import torch

import prunus
from prunus.codegen.onnx import run_onnx
from prunus.ir import capture
from prunus.models import example_inputs, tiny
from prunus.passes import PassManager, build_pipeline
from prunus.passes.prune import allocation, magnitude

GQA = ("llama", "mistral", "qwen2")


def _main(out):
    for key in ("logits", "last_hidden_state"):
        if isinstance(getattr(out, key, None), torch.Tensor):
            return getattr(out, key)
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.fixture(scope="module")
def llama():
    model = tiny("llama")
    calib = [example_inputs(model, batch=1, seq=16, seed=s) for s in range(3)]
    return model, example_inputs(model), calib


def _sliced(linear: torch.nn.Linear, idx: torch.Tensor, dim: int) -> torch.nn.Linear:
    w = linear.weight.detach().index_select(dim, idx)
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None)
    new.weight = torch.nn.Parameter(w)
    if linear.bias is not None:
        new.bias = torch.nn.Parameter(linear.bias.detach()[idx] if dim == 0 else linear.bias.detach())
    return new


def test_prune_mlp_equals_hand_pruned_llama(llama):
    model, x, _ = llama
    opt = prunus.optimize(model, "prune_mlp(ratio=0.25)", example_inputs=x)
    ref = copy.deepcopy(model)
    for layer in ref.model.layers:
        mlp = layer.mlp
        score = (mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1)
                 + mlp.down_proj.weight.pow(2).sum(0))
        keep = score.detach().double().topk(96).indices.sort().values
        mlp.gate_proj, mlp.up_proj = _sliced(mlp.gate_proj, keep, 0), _sliced(mlp.up_proj, keep, 0)
        mlp.down_proj = _sliced(mlp.down_proj, keep, 1)
    xs = example_inputs(model, batch=3, seq=11, seed=5)
    torch.testing.assert_close(opt(*xs).logits, ref(*xs).logits, rtol=1e-5, atol=1e-5)
    rec = opt.report[0]
    assert rec.params_before - rec.params_after == 2 * 32 * 64 * 3
    assert rec.flops_after < rec.flops_before and rec.modified
    assert model.model.layers[0].mlp.down_proj.weight.shape == (64, 128)  # the user's model is untouched


def test_prune_heads_removes_whole_kv_groups_like_a_hand_pruned_llama(llama):
    model, x, _ = llama
    opt = prunus.optimize(model, "prune_heads(ratio=0.5)", example_inputs=x)
    ref = copy.deepcopy(model)
    for layer in ref.model.layers:
        a = layer.self_attn
        q, k, v = (p.weight.detach().view(2, -1, 64) for p in (a.q_proj, a.k_proj, a.v_proj))
        o = a.o_proj.weight.detach().view(64, 2, 32)
        score = sum(t.pow(2).sum((1, 2)) for t in (q, k, v)) + o.pow(2).sum((0, 2))
        g = int(score.argmax())  # two KV groups of two query heads: keep the stronger group
        rows_q, rows_kv = torch.arange(32) + 32 * g, torch.arange(16) + 16 * g
        a.q_proj, a.o_proj = _sliced(a.q_proj, rows_q, 0), _sliced(a.o_proj, rows_q, 1)
        a.k_proj, a.v_proj = _sliced(a.k_proj, rows_kv, 0), _sliced(a.v_proj, rows_kv, 0)
    xs = example_inputs(model, batch=2, seq=9, seed=6)
    torch.testing.assert_close(opt(*xs).logits, ref(*xs).logits, rtol=1e-5, atol=1e-5)
    rec = opt.report[0]
    assert rec.params_before - rec.params_after == 2 * (32 * 64 + 2 * 16 * 64 + 64 * 32)
    assert "heads 8 -> 4" in rec.notes[0]


def _zeroed_reference(model, x, ratios: dict) -> torch.nn.Module:
    """`model` with the consumer columns of the lowest-magnitude units zeroed: what removing them computes."""
    graph = capture(model, x)
    found = graph.analysis("channel_groups")
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for kind, ratio in ratios.items():
            for g in getattr(found, kind):
                drop = math.floor(g.units * ratio + 0.5)
                removed = magnitude.score(graph, g, None).topk(drop, largest=False).indices
                for m in g.consumers:
                    params[m.weight.target].index_fill_(m.dim, m.index[removed].flatten(), 0.0)
    return ref


def test_pruning_equals_zeroing_the_removed_channels(arch, tiny_models):
    model, x = tiny_models(arch)
    heads_ratio = 0.5 if arch in GQA else 0.25
    opt = prunus.optimize(model, f"prune_mlp(ratio=0.25), prune_heads(ratio={heads_ratio})", example_inputs=x)
    ref = _zeroed_reference(model, x, {"mlp": 0.25, "heads": heads_ratio})
    with torch.no_grad():
        torch.testing.assert_close(_main(opt(*x)), _main(ref(*x)), rtol=1e-5, atol=1e-5)
    mlp_rec, heads_rec = opt.report
    width = 256 if arch == "gpt2" else 128
    assert mlp_rec.params_before - mlp_rec.params_after == \
        2 * width // 4 * (64 * (3 if arch in GQA else 2) + (0 if arch in GQA else 1))  # rows, columns, biases
    assert heads_rec.params_after < heads_rec.params_before and heads_rec.flops_after < heads_rec.flops_before


def test_three_query_heads_per_kv_group_as_in_smollm2():
    model = tiny("llama", hidden_size=144, num_attention_heads=9, num_key_value_heads=3, intermediate_size=96)
    x = example_inputs(model)
    opt = prunus.optimize(model, "prune_heads(ratio=0.34)", example_inputs=x)
    assert opt.report[0].notes[0].startswith("heads 18 -> 12")
    assert [s.num_heads for s in opt.graph.analysis("attention_sites")] == [6, 6]
    ref = _zeroed_reference(model, x, {"heads": 0.34})
    with torch.no_grad():
        torch.testing.assert_close(opt(*x).logits, ref(*x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(prunus.PassError, match="whole KV groups of 3; give a multiple of 3"):
        PassManager(build_pipeline("prune_heads(n=2)")).run(opt.graph)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_query_heads_within_kv_groups(attn):
    """within_kv_groups keeps K/V whole and removes as many query heads from every KV group: the same as
    zeroing their output-projection columns; the GQA repeat's literals (expand n_rep, reshape heads) follow."""
    model = tiny("llama", hidden_size=144, num_attention_heads=9, num_key_value_heads=3, intermediate_size=96,
                 attn_implementation=attn)
    x = example_inputs(model)
    opt = prunus.optimize(model, "prune_heads(ratio=0.34, within_kv_groups=true)", example_inputs=x)
    assert opt.report[0].notes[0].startswith("heads 18 -> 12")
    assert [(s.num_heads, s.num_kv_heads) for s in opt.graph.analysis("attention_sites")] == [(6, 3), (6, 3)]
    graph = capture(model, x)
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for g in graph.analysis("channel_groups").query_heads:
            per_group = magnitude.score(graph, g, None).view(3, 3)
            removed = torch.stack([3 * i + s.argmin() for i, s in enumerate(per_group)])  # one per KV group
            for m in g.consumers:
                params[m.weight.target].index_fill_(m.dim, m.index[removed].flatten(), 0.0)
        torch.testing.assert_close(opt(*x).logits, ref(*x).logits, rtol=1e-5, atol=1e-5)
    layer = model.model.layers[0].self_attn
    per_layer = 3 * 16 * 144 * 2  # q rows and o columns of three heads; k and v untouched
    assert opt.report[0].params_before - opt.report[0].params_after == 2 * per_layer
    assert {tuple(p.shape) for n, p in opt.graph.gm.named_parameters() if "k_proj" in n} == \
        {tuple(layer.k_proj.weight.shape)}
    with pytest.raises(prunus.PassError, match="as many query heads from each of the 3 KV groups"):
        prunus.optimize(model, "prune_heads(n=2, within_kv_groups=true)", example_inputs=x)


def test_query_heads_within_kv_groups_then_kv_cache():
    model = tiny("llama", hidden_size=144, num_attention_heads=9, num_key_value_heads=3, intermediate_size=96)
    x = example_inputs(model)
    opt = prunus.optimize(model, "prune_heads(ratio=0.34, within_kv_groups=true), kv_cache", example_inputs=x)
    ids = example_inputs(model, batch=2, seq=12, seed=3)[0]
    pruned = prunus.optimize(model, "prune_heads(ratio=0.34, within_kv_groups=true)", example_inputs=x)
    assert torch.equal(prunus.generate(opt, ids, 6), prunus.generate(pruned, ids, 6))


class ExplicitMHA(torch.nn.Module):
    """matmul -> softmax -> matmul attention with separate q, k, v projections and literal head counts."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, 4, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
        return x + self.o((att @ v).transpose(1, 2).reshape(b, s, 32))


def test_explicit_attention_heads_and_literals():
    torch.manual_seed(0)
    model, x = ExplicitMHA().eval(), (torch.randn(2, 5, 32),)
    opt = prunus.optimize(model, "prune_heads(ratio=0.5)", example_inputs=x)
    assert opt.graph.analysis("attention_sites")[0].num_heads == 2
    torch.testing.assert_close(opt(*x), _zeroed_reference(model, x, {"heads": 0.5})(*x), rtol=1e-5, atol=1e-5)


class ConstantNeurons(torch.nn.Module):
    """An MLP whose first four neurons output a constant: FLAP removes them and its bias makes up for it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8, bias=False)
        with torch.no_grad():
            self.up.weight[:4] = 0
            self.up.bias[:4] = torch.arange(1.0, 5.0)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_flap_bias_compensation_is_exact_for_constant_neurons():
    model, x = ConstantNeurons().eval(), (torch.randn(4, 8),)
    calib = [(torch.randn(16, 8),) for _ in range(2)]
    opt = prunus.optimize(model, "prune_mlp(ratio=0.25, importance=flap, round_to=1)", example_inputs=x,
                          calibration=calib)
    torch.testing.assert_close(opt(*x), model(*x), rtol=1e-5, atol=1e-5)
    down = [n for n in opt.graph.graph.nodes if n.target == torch.ops.aten.linear.default][-1]
    assert len(down.args) == 3  # a bias was created on the consumer
    plain = prunus.optimize(model, "prune_mlp(ratio=0.25, importance=flap, compensate=false, round_to=1)",
                            example_inputs=x, calibration=calib)
    assert (plain(*x) - model(*x)).abs().max() > 0.1


def test_pruned_llama_saves_reloads_and_exports(llama, tmp_path):
    model, x, calib = llama
    opt = prunus.optimize(model, "prune_mlp(ratio=0.5, importance=wanda, allocation=global), "
                                 "prune_heads(ratio=0.5, importance=flap, allocation=adaptive)",
                          example_inputs=x, calibration=calib)
    assert "bias compensation" in opt.report[1].notes[0]
    opt.save(str(tmp_path / "art"))
    again = prunus.load(str(tmp_path / "art"))
    xs = example_inputs(model, batch=2, seq=7, seed=3)
    torch.testing.assert_close(again(*xs).logits, opt(*xs).logits)
    assert again.graph.num_parameters() == opt.report[-1].params_after
    path = opt.export_onnx(str(tmp_path / "p.onnx"))
    np.testing.assert_allclose(run_onnx(path, list(xs), ["input_ids"])[0], opt(*xs).logits.numpy(), rtol=1e-4,
                               atol=1e-4)


def test_taylor_matches_autograd_on_the_hf_model(llama):
    model, x, calib = llama
    flags = [p.requires_grad for p in model.parameters()]
    opt = prunus.optimize(model, "prune_mlp(ratio=0.25, importance=taylor)", example_inputs=x, calibration=calib)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    ref = copy.deepcopy(model)
    for (ids,) in calib:
        logits = ref(ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for i, layer in enumerate(ref.model.layers):
        mlp = layer.mlp
        score = sum((p.weight * p.weight.grad).abs().sum(1) for p in (mlp.gate_proj, mlp.up_proj))
        score = score + (mlp.down_proj.weight * mlp.down_proj.weight.grad).abs().sum(0)
        keep = score.detach().double().topk(96).indices.sort().values
        pruned = opt.graph.gm.get_parameter(f"model.layers.{i}.mlp.down_proj.weight")
        assert torch.equal(pruned, mlp.down_proj.weight.detach()[:, keep])


def test_bad_prune_params():
    for spec, match in [("prune_mlp(ratio=1.5)", "out of range"), ("prune_mlp(ratio=0)", "out of range"),
                        ("prune_mlp(ratio=0.5, n=3)", "exactly one of ratio and n"),
                        ("prune_heads", "exactly one of ratio and n"),
                        ("prune_heads(ratio=0.5, importance=obs)", "unknown value"),
                        ("prune_mlp(ratio=0.5, allocation=greedy)", "unknown value")]:
        with pytest.raises(prunus.SpecError, match=match):
            build_pipeline(spec)


def test_prune_errors_name_the_problem(llama, tiny_models):
    model, x, _ = llama
    with pytest.raises(prunus.SpecError, match="calibration"):
        prunus.optimize(model, "prune_mlp(ratio=0.25, importance=wanda)", example_inputs=x)
    graph = capture(model, x)
    for spec, match in [("prune_heads(n=100)", "cannot remove 100 heads: the model has 8 in 2 layers"),
                        ("prune_heads(ratio=0.9)", "would remove every head of model.layers.0.self_attn"),
                        ("prune_heads(n=1)", "whole KV groups of 2"),
                        ("prune_mlp(n=5)", "do not split evenly over 2 layers")]:
        with pytest.raises(prunus.PassError, match=match):
            PassManager(build_pipeline(spec)).run(graph)
    vit, vx = tiny_models("vit")
    with pytest.raises(prunus.PassError, match="taylor needs a language model"):
        prunus.optimize(vit, "prune_mlp(ratio=0.25, importance=taylor)", example_inputs=vx, calibration=[vx])


def test_allocation_rules():
    a = torch.tensor([10.0, 11, 12, 13])
    b = torch.tensor([1.0, 2, 3, 4])
    common = dict(ratio=0.5, remove=None, round_to=1, pass_name="p", names=["a", "b"], unit="head")
    assert allocation.keep_counts([a, b], allocation="uniform", **common) == [2, 2]
    assert allocation.keep_counts([a, b], allocation="global", **common) == [3, 1]  # b keeps its floor of one
    assert allocation.keep_counts([a, b], allocation="adaptive", **common) == [2, 2]  # standardized: equal footing
    skewed = torch.tensor([10.0, 10.1, 10.2, 20])
    assert allocation.keep_counts([skewed, b], allocation="adaptive", **common) == [1, 3]
    wide = [torch.rand(128, generator=torch.Generator().manual_seed(0))]
    assert allocation.keep_counts(wide, ratio=0.3, remove=None, allocation="uniform", round_to=8, pass_name="p",
                                  names=["a"], unit="neuron") == [88]
    assert allocation.kept_units(torch.tensor([3.0, 1, 2, 5]), 2).tolist() == [0, 3]


def test_prune_layers_removes_the_lowest_block_influence_layer():
    model = tiny("llama", num_hidden_layers=3)
    x = example_inputs(model)
    calib = [example_inputs(model, batch=1, seq=16, seed=s) for s in range(2)]
    opt = prunus.optimize(model, "prune_layers(n=1)", example_inputs=x, calibration=calib)
    cos, tokens = [0.0] * 3, [0] * 3

    def hook(i):
        def record(mod, args, kwargs, out):
            x_in = (args[0] if args else kwargs["hidden_states"]).double().flatten(0, 1)
            x_out = (out[0] if isinstance(out, tuple) else out).double().flatten(0, 1)
            cos[i] += float(torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1).sum())
            tokens[i] += x_in.shape[0]
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for (ids,) in calib:
            model(ids)
    for h in handles:
        h.remove()
    bi = [1 - c / t for c, t in zip(cos, tokens)]
    worst = min(range(3), key=bi.__getitem__)
    assert opt.report[0].notes[0].startswith(f"removed layer {worst}; block influence")
    ref = copy.deepcopy(model)
    ref.model.layers = torch.nn.ModuleList(layer for i, layer in enumerate(ref.model.layers) if i != worst)
    xs = example_inputs(model, batch=2, seq=9, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(opt(*xs).logits, ref(*xs, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    rec = opt.report[0]
    assert rec.params_before - rec.params_after == sum(p.numel() for p in model.model.layers[worst].parameters())
    with pytest.raises(prunus.PassError, match="at least one must stay"):
        PassManager(build_pipeline("prune_layers(n=3)"), calibration=calib).run(capture(model, x))


def test_prune_layers_refuses_post_norm(tiny_models):
    bert, x = tiny_models("bert")
    with pytest.raises(prunus.PassError, match="needs a pre-norm stack"):
        prunus.optimize(bert, "prune_layers(n=1)", example_inputs=x, calibration=[x])


def _removed(note: str) -> list[str]:
    return note.split(";")[0].removeprefix("removed ").split(", ")


def test_prune_layers_removes_adjacent_layers():
    """Three of four layers go, so at least two are adjacent: each must pass on what it received."""
    model = tiny("llama", num_hidden_layers=4)
    x = example_inputs(model)
    calib = [example_inputs(model, batch=1, seq=16, seed=s) for s in range(2)]
    opt = prunus.optimize(model, "prune_layers(n=3)", example_inputs=x, calibration=calib)
    gone = [int(name.split()[1]) for name in _removed(opt.report[0].notes[0])]
    assert len(gone) == 3
    ref = copy.deepcopy(model)
    ref.model.layers = torch.nn.ModuleList(layer for i, layer in enumerate(ref.model.layers) if i not in gone)
    xs = example_inputs(model, batch=2, seq=9, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(opt(*xs).logits, ref(*xs, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    rec = opt.report[0]
    assert rec.params_before - rec.params_after == sum(p.numel() for i in gone for p in model.model.layers[i].parameters())


def _skip_blocks(model, blocks):
    """A copy of a Llama with the given (layer, kind) blocks computing zero (o_proj / down_proj zeroed)."""
    ref = copy.deepcopy(model)
    for i, kind in blocks:
        layer = ref.model.layers[i]
        out = layer.self_attn.o_proj if kind == "attention" else layer.mlp.down_proj
        torch.nn.init.zeros_(out.weight)
    return ref


def test_prune_layers_ppl_criterion_removes_attention_and_mlp_blocks():
    model = tiny("llama", num_hidden_layers=3)
    x = example_inputs(model)
    calib = [example_inputs(model, batch=1, seq=16, seed=s) for s in range(2)]

    def loss(m):
        with torch.no_grad():
            return sum(float(torch.nn.functional.cross_entropy(m(ids).logits[:, :-1].flatten(0, 1),
                                                               ids[:, 1:].flatten())) for (ids,) in calib) / 2

    candidates = [(i, kind) for i in range(3) for kind in ("attention", "mlp")]
    increase = {c: loss(_skip_blocks(model, [c])) - loss(model) for c in candidates}
    expected = sorted(candidates, key=lambda c: (increase[c], candidates.index(c)))[:2]
    opt = prunus.optimize(model, "prune_layers(n=2, criterion=ppl, part=any)", example_inputs=x, calibration=calib)
    note = opt.report[0].notes[0]
    assert sorted(_removed(note)) == sorted(f"layer {i} {kind}" for i, kind in expected)
    assert "loss increase" in note
    xs = example_inputs(model, batch=2, seq=9, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(opt(*xs).logits, _skip_blocks(model, expected)(*xs, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
    layers = model.model.layers
    block_params = {"attention": lambda L: [*L.self_attn.parameters(), L.input_layernorm.weight],
                    "mlp": lambda L: [*L.mlp.parameters(), L.post_attention_layernorm.weight]}
    rec = opt.report[0]
    assert rec.params_before - rec.params_after == sum(p.numel() for i, kind in expected
                                                       for p in block_params[kind](layers[i]))
    # part=mlp with block influence removes MLP blocks only
    mlp = prunus.optimize(model, "prune_layers(ratio=0.34, part=mlp)", example_inputs=x, calibration=calib)
    assert [name.split()[2] for name in _removed(mlp.report[0].notes[0])] == ["mlp"]


def test_prune_layers_params_errors(tiny_models):
    model = tiny("llama", num_hidden_layers=2)
    x = example_inputs(model)
    with pytest.raises(prunus.SpecError, match="disagree"):
        prunus.optimize(model, "prune_layers(n=1, criterion=block_influence, importance=ppl)", example_inputs=x)
    with pytest.raises(prunus.SpecError):
        prunus.optimize(model, "prune_layers(n=1, part=heads)", example_inputs=x)
    vit, vx = tiny_models("vit")
    with pytest.raises(prunus.PassError, match="criterion=ppl needs a language model"):
        prunus.optimize(vit, "prune_layers(n=1, criterion=ppl, part=mlp)", example_inputs=vx, calibration=[vx])
