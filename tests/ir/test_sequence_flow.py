"""sequence_flow: which tensors carry the token dimension, in which dims, with which role."""
import torch

import prunus
from prunus.models import example_inputs, tiny


def _flow(arch):
    model = tiny(arch)
    graph = prunus.ir.capture(model, example_inputs(model))
    return graph, graph.analysis("sequence_flow")


def test_llama_hidden_rope_mask_kv():
    graph, flow = _flow("llama")
    assert flow.symbolic and flow.dims[flow.stream] == (1,)
    roles = {}
    for node, role in flow.roles.items():
        roles.setdefault(role, []).append(node)
    masks = [n for n in roles["mask"] if n.meta["val"].dim() == 4]
    assert masks and all(flow.dims[n] == (2, 3) for n in masks)
    kv = roles["kv"]
    assert len(kv) == 4 and all(flow.dims[n] == (2,) for n in kv)  # k and v of two layers, [b, h, s, d]
    tables = [n for n in roles["table"] if n.target == torch.ops.aten.cos.default]
    assert tables and flow.dims[tables[0]] == (1,)  # RoPE cos [1, s, d]
    assert roles["positions"] and roles["size"]
    logits = graph.output_node().args[0][0]
    assert flow.roles[logits] == "hidden" and flow.dims[logits] == (1,)


def test_vit_has_a_fixed_token_count():
    graph, flow = _flow("vit")
    assert not flow.symbolic and flow.count == 17  # 16 patches + CLS
    assert flow.dims[flow.stream] == (1,)
    assert any(r == "mask" for r in flow.roles.values()) or any(r == "kv" for r in flow.roles.values())
