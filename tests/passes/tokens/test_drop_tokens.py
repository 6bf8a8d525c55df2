"""drop_tokens against references: Hugging Face runs on the kept tokens, eager attention probabilities,
shapes at unseen lengths, ONNX Runtime, and the typed errors."""
import math

import pytest
import torch

import prunus
from prunus.errors import PassError, SpecError
from prunus.ir.capture import capture
from prunus.models import example_inputs, tiny


def _kept_indices(opt, ids) -> dict:
    """layer -> the kept positions [b, k] the graph computes for `ids` (read from the marked index nodes)."""
    gm = opt.graph.gm
    marked = {n: n.meta["prunus_token_keep"]["layer"] for n in gm.graph.nodes if "prunus_token_keep" in n.meta}
    seen = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in marked:
                seen[marked[n]] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(ids)
    return seen


def _reference_selection(model, ids, layer, keep, sink=4, window=8):
    """Top-k of the attention the last `window` queries pay at layer `layer - 1` (eager probabilities)."""
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            probs = model(ids, output_attentions=True).attentions[layer - 1]
    finally:
        model.config._attn_implementation = "sdpa"
    s = ids.shape[1]
    score = probs[:, :, -window:, :].float().sum(dim=(1, 2))
    pos = torch.arange(s)
    score = score.masked_fill(pos < sink, 1e30).masked_fill(pos == s - 1, math.inf)
    k = s - math.floor((1 - keep) * s)
    return score.topk(k, dim=-1).indices.sort(dim=-1).values


def _run_on_kept(model, ids, after_layer, idx):
    """The Hugging Face model with layers >= after_layer fed only the kept tokens (positions travel along)."""
    b = torch.arange(ids.shape[0])[:, None]
    handles = []

    def take(x):
        return x[b, idx] if x.dim() == 3 else x

    def hook(module, args, kwargs):
        i = module.self_attn.layer_idx
        if i == after_layer:
            args = (take(args[0]),) + args[1:] if args else args
            if not args:
                kwargs["hidden_states"] = take(kwargs["hidden_states"])
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (take(cos.expand(ids.shape[0], -1, -1)), take(sin.expand(ids.shape[0], -1, -1)))
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            kwargs["attention_mask"] = _gather_mask(mask, idx)
        return args, kwargs

    for layer in model.model.layers[after_layer:]:
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def _gather_mask(mask, idx):
    m = mask.expand(idx.shape[0], -1, -1, -1)
    rows = torch.stack([m[i][:, idx[i]][:, :, idx[i]] for i in range(idx.shape[0])])
    return rows


@pytest.fixture(scope="module")
def llama():
    model = tiny("llama", num_hidden_layers=4)
    return model, example_inputs(model, seq=24)


def test_attention_matches_reference_selection_and_run(llama):
    model, (ids,) = llama
    # A meta default device: every tensor the pass creates must follow the graph's device (on a GPU-captured
    # graph the default device is still the CPU), or the selection below fails.
    with torch.device("meta"):
        opt = prunus.optimize(model, "drop_tokens(keep=0.5, after_layer=2)", example_inputs=(ids,), verify=False)
    idx = _kept_indices(opt, ids)[2]
    assert torch.equal(idx, _reference_selection(model, ids, 2, 0.5))
    assert (idx[:, :4] == torch.arange(4)).all() and (idx[:, -1] == ids.shape[1] - 1).all()
    got = opt(ids).logits
    want = _run_on_kept(model, ids, 2, idx)
    assert got.shape == (2, 12, model.config.vocab_size)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_progressive_schedule_composes_and_keeps_order(llama):
    model, (ids,) = llama
    opt = prunus.optimize(model, "simplify_masks, drop_tokens(method=cascade, schedule=[[1, 0.5], [3, 0.25]])",
                          example_inputs=(ids,), verify=False)
    marks = sorted(n.meta["prunus_token_keep"]["layer"] for n in opt.graph.gm.graph.nodes
                   if "prunus_token_keep" in n.meta)
    assert marks == [1, 3]  # one marked index per point, for the KV-cache rewrite
    kept = _kept_indices(opt, ids)
    assert kept[1].shape == (2, 12) and kept[3].shape == (2, 6)
    final = torch.gather(kept[1], 1, kept[3])  # positions in the original prompt
    assert (final.diff(dim=-1) > 0).all() and (final[:, -1] == 23).all()
    for s in (7, 40):  # symbolic counts: ceil(0.5 s), then ceil(0.5 of that)
        x = torch.randint(0, 256, (3, s))
        k1 = s - math.floor(0.5 * s)
        assert opt(x).logits.shape == (3, k1 - math.floor(0.5 * k1), 256)


def test_keep_one_is_exact(llama):
    model, (ids,) = llama
    opt = prunus.optimize(model, "drop_tokens(keep=1.0, after_layer=1)", example_inputs=(ids,), verify=False)
    torch.testing.assert_close(opt(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_gemfilter_runs_whole_model_on_the_selection(llama):
    model, (ids,) = llama
    opt = prunus.optimize(model, "drop_tokens(method=gemfilter, keep=0.5, after_layer=2)", example_inputs=(ids,),
                          verify=False)
    idx = _kept_indices(opt, ids)[2]
    assert torch.equal(idx, _reference_selection(model, ids, 2, 0.5))
    with torch.no_grad():
        want = model(torch.gather(ids, 1, idx), position_ids=idx).logits
    torch.testing.assert_close(opt(ids).logits, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch,method", [("qwen2", "cascade"), ("gpt2", "ttv"), ("opt", "attention"),
                                         ("bert", "tome"), ("vit", "zerotprune")])
def test_shapes_at_unseen_lengths(arch, method):
    model = tiny(arch)
    x = example_inputs(model, seq=10)
    opt = prunus.optimize(model, f"drop_tokens(method={method}, keep=0.5, after_layer=1, sink=1)", example_inputs=x,
                          verify=False)
    if arch == "vit":
        images = example_inputs(model, batch=3)[0]
        assert opt(images).logits.shape == (3, 10)
        return
    for s in (6, 31):
        ids = torch.randint(0, 256, (3, s))
        out = opt(ids)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
        expect = s - (s - 2) // 2 if method == "tome" else s - s // 2
        assert hidden.shape[:2] == (3, expect) and torch.isfinite(hidden).all()


def test_capture_traces_attention_without_the_backends_that_specialise_seq():
    # On CUDA, efficient attention's mask alignment (and cuDNN's checks) add guards that fix the sequence
    # length at the example's; capture traces SDPA through flash (which refuses masks) or math only.
    seen = []
    flags = (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.mem_efficient_sdp_enabled,
             torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.math_sdp_enabled)

    class Attention(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(f() for f in flags))
            return torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)

    before = tuple(f() for f in flags)
    graph = capture(Attention(), (torch.randn(2, 5, 8),))
    assert seen and set(seen) == {(True, False, False, True)}
    assert tuple(f() for f in flags) == before  # the user's settings are restored
    assert graph.inputs[0].dynamic == {0: "batch", 1: "seq"}


@pytest.mark.parametrize("arch,spec", [("llama", "drop_tokens(keep=0.5, after_layer=1)"),
                                       ("vit", "drop_tokens(method=tome, keep=0.5, after_layer=1, sink=1)")])
def test_onnx_matches_pytorch(tmp_path, arch, spec):
    from prunus.codegen.onnx.export import check_parity

    model = tiny(arch)
    x = example_inputs(model, seq=12)
    opt = prunus.optimize(model, spec, example_inputs=x, verify=False)
    path = opt.export_onnx(str(tmp_path / "m.onnx"))  # checks parity at the example inputs
    other = [example_inputs(model, batch=3, seq=21, seed=5)[0]]
    assert check_parity(opt.graph, path, other) < 1e-3


def test_errors(llama):
    model, x = llama
    for spec in ("drop_tokens(keep=0)", "drop_tokens(keep=1.5)", "drop_tokens(schedule=[[2, 0.3], [1, 0.5]])"):
        with pytest.raises(SpecError):
            prunus.optimize(model, spec, example_inputs=x, verify=False)
    with pytest.raises(SpecError, match="beyond the model's depth"):
        prunus.optimize(model, "drop_tokens(after_layer=5)", example_inputs=x, verify=False)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(PassError, match="no attention sites"):
        prunus.optimize(mlp, "drop_tokens", example_inputs=(torch.randn(2, 5, 8),), verify=False)
