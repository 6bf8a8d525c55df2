import json
import os
from dataclasses import dataclass

import pytest
import torch

import prunus
from prunus.passes import LossyParams, Pass, PassResult, param, register
from prunus.passes.manager import PassManager


def _first_weight(graph):
    return next(n for n in graph.graph.nodes if n.op == "get_attr" and graph.is_parameter(n))


def _scale_weight(graph, factor):
    node = _first_weight(graph)
    owner, _, attr = node.target.rpartition(".")
    mod = graph.gm.get_submodule(owner)
    setattr(mod, attr, torch.nn.Parameter(getattr(mod, attr).detach() * factor, requires_grad=False))


@dataclass(kw_only=True)
class NoiseParams(LossyParams):
    factor: float = param(1.01, "scale of the first weight", range="(0, 10]")


@register
class ScaleFirstWeight(Pass):
    """Test pass: scale the first weight (lossy)."""

    name = "test_scale_first_weight"
    kind = "lossy"
    Params = NoiseParams

    def run(self, graph, ctx):
        _scale_weight(graph, self.params.factor)
        return PassResult(modified=True, notes=[f"scaled by {self.params.factor}"])


@register
class LyingExactPass(Pass):
    """Test pass: claims to be exact but changes a weight."""

    name = "test_lying_exact"

    def run(self, graph, ctx):
        _scale_weight(graph, 1.5)
        return PassResult(modified=True)


@register
class BreakShapes(Pass):
    """Test pass: rewires a linear to a weight of the wrong shape."""

    name = "test_break_shapes"

    def run(self, graph, ctx):
        lin = next(n for n in graph.graph.nodes if n.target == torch.ops.aten.linear.default)
        name = graph.add_constant(torch.zeros(3, 3))
        with graph.graph.inserting_before(lin):
            bad = graph.graph.get_attr(name)
        lin.args = (lin.args[0], bad) + tuple(lin.args[2:])
        return PassResult(modified=True)


@register
class Crashes(Pass):
    """Test pass: raises a plain Python error."""

    name = "test_crashes"

    def run(self, graph, ctx):
        raise KeyError("boom")


def test_report_records_figures_for_every_pass(tiny_models, tmp_path):
    model, x = tiny_models("llama")
    opt = prunus.optimize(model, "dce, test_scale_first_weight(factor=1.05)", example_inputs=x,
                          dump_dir=str(tmp_path / "dump"))
    dce, lossy = opt.report
    n = sum(p.numel() for p in model.parameters())
    assert dce.params_before == dce.params_after == n
    assert dce.flops_before > 0 and dce.flops_after == pytest.approx(dce.flops_before)
    # FLOPs per token of a linear-dominated model: 2 * (non-embedding matmul weights) plus attention
    matmul_weights = sum(p.numel() for name, p in model.named_parameters() if "proj" in name or "lm_head" in name)
    assert dce.flops_before >= 2 * matmul_weights
    assert dce.kind == "exact" and "max_abs_error" in dce.verification
    assert lossy.kind == "lossy" and set(lossy.verification) >= {"top1", "kl", "sqnr_db", "budget"}
    assert 0 < lossy.verification["kl"] < 1 and lossy.verification["sqnr_db"] > 10
    assert lossy.params["factor"] == 1.05 and lossy.seconds >= 0 and lossy["name"] == "test_scale_first_weight"
    files = sorted(os.listdir(tmp_path / "dump"))
    assert files == ["00_captured.json", "00_captured.txt", "01_dce.json", "01_dce.txt",
                     "02_test_scale_first_weight.json", "02_test_scale_first_weight.txt", "report.json"]
    assert "history:\n  1. dce\n  2. test_scale_first_weight(factor=1.05)" in (
        tmp_path / "dump" / "02_test_scale_first_weight.txt").read_text()
    assert len(json.loads((tmp_path / "dump" / "report.json").read_text())) == 2
    table = prunus.report_table(opt)
    assert table.row_count == 2
    text = str(table)  # plain print() renders it
    assert "test_scale_first_weight(factor=1.05)" in text and "lossy" in text and "<rich" not in text


def test_lossy_budget_violation_raises(tiny_models):
    model, x = tiny_models("llama")
    opt = prunus.optimize(model, "test_scale_first_weight(factor=1.01, min_top1=0.5)", example_inputs=x)
    assert opt.report[0].verification["budget"] == {"min_top1": 0.5}
    with pytest.raises(prunus.VerificationError) as err:
        prunus.optimize(model, "test_scale_first_weight(factor=3, min_sqnr_db=80)", example_inputs=x)
    assert err.value.metric == "sqnr_db" and "min_sqnr_db=80" in str(err.value)


def test_exact_pass_that_changes_outputs_fails_verification(tiny_models):
    model, x = tiny_models("gpt2")
    with pytest.raises(prunus.VerificationError, match="max_abs_error"):
        prunus.optimize(model, "dce, test_lying_exact", example_inputs=x)
    opt = prunus.optimize(model, "dce, test_lying_exact", example_inputs=x, verify=False)
    assert opt.report[1].verification == {}


def test_wrong_shape_is_caught_at_the_pass(tiny_models):
    model, x = tiny_models("llama")
    with pytest.raises(prunus.PassError) as err:
        prunus.optimize(model, "test_break_shapes", example_inputs=x)
    assert "test_break_shapes" in str(err.value) and "shape propagation failed" in str(err.value)


def test_crash_inside_a_pass_is_a_pass_error(tiny_models):
    model, x = tiny_models("llama")
    with pytest.raises(prunus.PassError, match="test_crashes.*KeyError"):
        prunus.optimize(model, "test_crashes", example_inputs=x)


def test_user_model_is_never_modified(tiny_models):
    model, x = tiny_models("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prunus.optimize(model, "dce, fold_constants, simplify_masks, test_scale_first_weight(factor=2)", example_inputs=x)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
