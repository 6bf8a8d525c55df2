import pytest
import torch

import prunus
from prunus.ir.ops import ATTENTION
from prunus.models import example_inputs, tiny
from tests.conftest import CLEANUP, main_output


def _sdpa_nodes(graph):
    return [n for n in graph.graph.nodes if n.op == "call_function" and n.target in ATTENTION]


def _mask_and_causal(node):
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    return mask, causal


def test_cleanup_pipeline_reproduces_every_architecture(arch, tiny_models, cleaned):
    model, x = tiny_models(arch)
    opt = cleaned(arch)
    assert [r.name for r in opt.report] == ["dce", "fold_constants", "simplify_masks"]
    for batch, seq, seed in ((2, 8, 0), (3, 13, 1), (1, 4, 2)):
        xs = x if seed == 0 else example_inputs(model, batch=batch, seq=seq, seed=seed)
        torch.testing.assert_close(main_output(opt(*xs)), main_output(model(*xs)), rtol=1e-4, atol=1e-4)
    for r in opt.report:
        assert r.verification["max_abs_error"] <= r.verification["budget"]["max_abs_error"]
        assert r.params_after == r.params_before  # clean-up never changes the weights


def test_simplify_masks_makes_decoders_causal_and_drops_encoder_masks(arch, cleaned):
    graph = cleaned(arch).graph
    sdpas = _sdpa_nodes(graph)
    assert len(sdpas) == 2
    for node in sdpas:
        mask, causal = _mask_and_causal(node)
        assert mask is None
        assert causal == (arch not in ("bert", "vit"))
    assert not any(n.target == torch.ops.aten.diff.default for n in graph.graph.nodes)  # mask code is gone


def test_simplify_masks_keeps_a_padding_mask_that_reads_input_values():
    class WithPadding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = tiny("bert")

        def forward(self, ids, attention_mask):
            return self.bert(input_ids=ids, attention_mask=attention_mask).last_hidden_state

    model = WithPadding().eval()
    ids = torch.randint(0, 256, (2, 6))
    pad = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    opt = prunus.optimize(model, "simplify_masks", example_inputs=(ids, pad))
    assert all(_mask_and_causal(n)[0] is not None for n in _sdpa_nodes(opt.graph))
    assert not opt.report[0].modified
    torch.testing.assert_close(opt(ids, pad), model(ids, pad), rtol=1e-5, atol=1e-5)


def test_simplify_masks_leaves_a_sliding_window_mask_alone():
    model = tiny("mistral", sliding_window=20)
    x = example_inputs(model, seq=8)
    opt = prunus.optimize(model, "simplify_masks", example_inputs=x)
    # causal at 8 tokens but not past 20: the probe sizes include a length past the window literal
    assert all(_mask_and_causal(n)[0] is not None for n in _sdpa_nodes(opt.graph))
    long = example_inputs(model, batch=1, seq=30, seed=3)
    torch.testing.assert_close(opt(*long).logits, model(*long).logits, rtol=1e-4, atol=1e-4)


def test_simplify_masks_probes_on_the_graph_device_not_the_default_one(tiny_models):
    # On a GPU-captured graph the mask ops name cuda while the default device is the CPU; here the default is
    # 'meta', so any probe or reference tensor the pass builds on the default device fails (no values there).
    model, x = tiny_models("llama")
    with torch.device("meta"):
        opt = prunus.optimize(model, "simplify_masks", example_inputs=x)
    assert opt.report[0].modified
    assert all(_mask_and_causal(n) == (None, True) for n in _sdpa_nodes(opt.graph))
    torch.testing.assert_close(opt(*x).logits, model(*x).logits, rtol=1e-5, atol=1e-5)


class Unused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(4, 4)
        self.unused = torch.nn.Linear(4, 100)
        self.register_buffer("scale", torch.tensor([2.0]))

    def forward(self, x):
        self.unused(x)  # computed, never used
        return self.used(x) * (self.scale * 3 + 1).exp()


def test_dce_removes_dead_ops_and_their_parameters_and_fold_constants_folds_buffers():
    model = Unused().eval()
    x = torch.randn(2, 4)
    opt = prunus.optimize(model, "dce, fold_constants", example_inputs=(x,))
    dce, fold = opt.report
    assert dce.params_before == 20 + 500 and dce.params_after == 20
    assert dce.modified and "freed 500 parameters" in dce.notes
    assert fold.modified and "folded 1 constants" in fold.notes[0]
    ops = [n.target for n in opt.graph.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.exp.default not in ops and torch.ops.aten.mul.Tensor in ops
    torch.testing.assert_close(opt(x), model(x))
    assert sum(p.numel() for p in model.parameters()) == 520  # the user's model keeps its weights


def test_fold_constants_never_folds_parameters():
    lin = torch.nn.Linear(4, 4).eval()

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return x @ self.lin.weight.t() * 2

    opt = prunus.optimize(M(), "fold_constants", example_inputs=(torch.randn(2, 4),))
    assert "folded 0 constants" in opt.report[0].notes[0]
    assert opt.graph.num_parameters() == 16 and not any(n.startswith("_folded") for n, _ in opt.graph.gm.named_buffers())


def test_shape_only_ancestors_follows_values_behind_sizes():
    from prunus.passes.cleanup.simplify_masks import shape_only_ancestors

    aten = torch.ops.aten
    g = torch.fx.Graph()
    x = g.placeholder("x")
    positions = g.call_function(aten.arange.default, (g.call_function(aten.sym_size.int, (x, 1)),))
    assert shape_only_ancestors(positions) >= {x, positions}  # the input's size alone: size-only
    # a value path to the same input, walked after its size was seen, still rejects the mask
    mixed = g.call_function(aten.add.Tensor, (g.call_function(aten.sum.default, (x,)), positions))
    assert shape_only_ancestors(mixed) is None
    # the size of an intermediate tensor (tokens kept by a drop point) depends on its values
    kept = g.call_function(aten.neg.default, (x,))
    assert shape_only_ancestors(g.call_function(aten.arange.default,
                                                (g.call_function(aten.sym_size.int, (kept, 1)),))) is None
