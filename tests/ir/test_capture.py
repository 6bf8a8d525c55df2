import pytest
import torch

import prunus
from prunus.ir import capture, to_json, to_text
from prunus.models import example_inputs, tiny
from tests.conftest import main_output


def test_capture_reproduces_every_architecture_at_new_shapes(arch, tiny_models):
    model, x = tiny_models(arch)
    graph = capture(model, x)
    assert graph.inputs[0].dynamic[0] == "batch"
    assert ("seq" in graph.inputs[0].dynamic.values()) == (arch != "vit")
    for batch, seq in ((2, 8), (3, 5), (1, 13)):
        xs = example_inputs(model, batch=batch, seq=seq, seed=batch)
        want, got = model(*xs), graph(*xs)
        assert type(got) is type(want)  # same output structure as the model
        torch.testing.assert_close(main_output(got), main_output(want), rtol=1e-5, atol=1e-5)


def test_cache_returning_causal_lm_is_captured_without_touching_the_model():
    model = tiny("llama")
    assert model.config.use_cache  # its forward returns a DynamicCache by default
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    graph = capture(model, (torch.randint(0, 256, (1, 6)),))  # batch 1 is widened so batch stays dynamic
    assert model.training and model.config.use_cache
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    x = torch.randint(0, 256, (4, 9))
    torch.testing.assert_close(graph(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    assert graph(x).past_key_values is None


def test_graph_keeps_shapes_modules_and_parameters(tiny_models):
    model, x = tiny_models("llama")
    graph = capture(model, x)
    linears = [n for n in graph.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    assert str(linears[0].meta["val"].shape[0]) != "2"  # symbolic batch
    assert linears[0].meta["nn_module_stack"]
    assert graph.num_parameters() == sum(p.numel() for p in model.parameters())
    names = {n for n, *_ in graph.param_table()}
    assert "model.layers.0.self_attn.q_proj.weight" in names


def test_printer_text_and_json(tiny_models):
    import json

    model, x = tiny_models("llama")
    graph = capture(model, x)
    text = to_text(graph)
    assert "input input_ids: i64[batch, seq]" in text
    assert "model.layers.1.self_attn.q_proj (Linear)" in text
    assert "= aten.linear(" in text and ": f32[batch, seq, 64]" in text
    assert "output logits = " in text and "f32[batch, seq, 256]" in text
    data = json.loads(to_json(graph))
    assert data["num_parameters"] == graph.num_parameters()
    assert data["outputs"] == ["logits"]
    ops = [n for n in data["nodes"] if n["op"] == "call_function"]
    assert len(ops) == len([n for n in graph.graph.nodes if n.op == "call_function"])
    q = next(n for n in ops if n["module"] == "model.layers.0.self_attn.q_proj")
    assert q["target"] == "aten.linear" and q["type"] == "f32[batch, seq, 64]"


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.proj(x)
        return -x


def test_uncapturable_model_raises_capture_error_saying_where():
    with pytest.raises(prunus.CaptureError) as err:
        capture(DataDependent(), (torch.randn(2, 3, 4),))
    msg = str(err.value)
    assert "DataDependent" in msg
    assert "test_capture.py" in msg and "x.sum() > 0" in msg  # the model line that failed
    assert "try:" in msg


def test_bad_capture_arguments():
    with pytest.raises(prunus.CaptureError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(2),))
    with pytest.raises(prunus.CaptureError, match="no tensor"):
        capture(torch.nn.Identity(), (1, 2))
    with pytest.raises(prunus.CaptureError, match="tuple of positional inputs"):
        capture(torch.nn.Identity(), {"x": torch.randn(2)})


def test_constants_named_after_sequential_paths_get_identifiers():
    """nn.Sequential's module paths start with a digit ("0"); a constant named after one gets a leading "_" (it
    looped forever looking for a free identifier), and names stay unique."""
    graph = capture(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
    names = [graph.add_constant(torch.zeros(1), prefix) for prefix in ("0_qweight", "0_qweight", "a.b", "x")]
    assert names == ["_0_qweight", "_0_qweight0", "a_b", "x"]
    assert all(hasattr(graph.gm, n) for n in names)
