"""prune_hidden: channels of the residual stream removed from embeddings, projections and norms. On llama
(RMSNorm) the pruned graph equals the original with the removed channels zeroed in every residual writer; on
gpt2 (LayerNorm, tied embedding, Conv1D) it equals a hand-sliced copy; bert and vit refuse with the reason."""
import copy

import numpy as np
import pytest
import torch

import prunus
from prunus.codegen.onnx import run_onnx
from prunus.ir import capture
from prunus.models import example_inputs, tiny
from prunus.passes.prune import magnitude


def _dropped(model, x, ratio):
    graph = capture(model, x)
    (group,) = graph.analysis("channel_groups").hidden
    drop = round(group.units * ratio)
    return magnitude.score(graph, group, None).topk(drop, largest=False).indices.sort().values


def test_prune_hidden_llama_equals_zeroing_the_removed_channels():
    model = tiny("llama")
    x = example_inputs(model)
    removed = _dropped(model, x, 0.25)
    opt = prunus.optimize(model, "prune_hidden(ratio=0.25)", example_inputs=x)
    ref = copy.deepcopy(model)
    with torch.no_grad():  # nothing writes the removed channels: they stay zero through every norm
        ref.model.embed_tokens.weight[:, removed] = 0
        for layer in ref.model.layers:
            layer.self_attn.o_proj.weight[removed] = 0
            layer.mlp.down_proj.weight[removed] = 0
        xs = example_inputs(model, batch=2, seq=9, seed=3)
        torch.testing.assert_close(opt(*xs).logits, ref(*xs).logits, rtol=1e-5, atol=1e-5)
    rec = opt.report[0]
    cut = len(removed)
    per_layer = 64 + 2 * 32 + 64 + 3 * 128 + 2  # q, k, v, o; gate, up, down; two norms (per hidden channel)
    vocab = model.config.vocab_size
    assert cut == 16 and "channels 64 -> 48" in rec.notes[0]
    assert rec.params_before - rec.params_after == cut * (2 * vocab + 2 * per_layer + 1)
    assert opt.graph.gm.get_parameter("model.norm.weight").shape == (48,)


def _slice_gpt2(model, keep):
    ref = copy.deepcopy(model)
    t = ref.transformer

    def cut(param, dim):
        return torch.nn.Parameter(param.detach().index_select(dim, keep))

    t.wte.weight = cut(t.wte.weight, 1)
    ref.lm_head.weight = t.wte.weight
    t.wpe.weight = cut(t.wpe.weight, 1)
    for ln in [t.ln_f] + [b.ln_1 for b in t.h] + [b.ln_2 for b in t.h]:
        ln.weight, ln.bias = cut(ln.weight, 0), cut(ln.bias, 0)
        ln.normalized_shape = (len(keep),)
    for b in t.h:
        for conv in (b.attn.c_attn, b.mlp.c_fc):  # Conv1D weights are [in, out]
            conv.weight = cut(conv.weight, 0)
        for conv in (b.attn.c_proj, b.mlp.c_proj):
            conv.weight, conv.bias = cut(conv.weight, 1), cut(conv.bias, 0)
            conv.nf = len(keep)
    return ref


def test_prune_hidden_gpt2_equals_a_hand_sliced_model(tmp_path):
    model = tiny("gpt2")
    x = example_inputs(model)
    removed = _dropped(model, x, 0.25)
    keep = torch.tensor(sorted(set(range(64)) - set(removed.tolist())))
    opt = prunus.optimize(model, "prune_hidden(ratio=0.25)", example_inputs=x)
    ref = _slice_gpt2(model, keep)
    xs = example_inputs(model, batch=2, seq=9, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(opt(*xs).logits, ref(*xs).logits, rtol=1e-5, atol=1e-5)
    assert opt.report[0].params_after == sum(p.numel() for p in ref.parameters())  # the tied weight counts once
    path = opt.export_onnx(str(tmp_path / "h.onnx"))
    np.testing.assert_allclose(run_onnx(path, list(xs), ["input_ids"])[0], opt(*xs).logits.numpy(), rtol=1e-4,
                               atol=1e-4)


def test_prune_hidden_with_calibrated_criteria_shrinks_and_runs():
    model = tiny("llama")
    x = example_inputs(model)
    calib = [example_inputs(model, batch=1, seq=16, seed=s) for s in range(2)]
    for importance in ("wanda", "flap", "taylor"):
        opt = prunus.optimize(model, f"prune_hidden(ratio=0.5, importance={importance})", example_inputs=x,
                              calibration=calib)
        assert opt.graph.gm.get_parameter("model.embed_tokens.weight").shape[1] == 32
        assert torch.isfinite(opt(*x).logits).all()


def test_prune_hidden_refuses_what_it_cannot_slice(tiny_models):
    bert, bx = tiny_models("bert")
    with pytest.raises(prunus.PassError, match="no prunable channel group found.*reach a graph output"):
        prunus.optimize(bert, "prune_hidden(ratio=0.25)", example_inputs=bx)
    vit, vx = tiny_models("vit")
    with pytest.raises(prunus.PassError, match="no token embedding starts the residual stream"):
        prunus.optimize(vit, "prune_hidden(ratio=0.25)", example_inputs=vx)
