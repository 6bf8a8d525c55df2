"""channel_groups on every tiny architecture: MLP neuron groups, head groups (GQA, fused qkv) and the shape
literals a pruning pass must rewrite; hand-written graphs for what cannot be pruned."""
import torch

from prunus.ir import capture
from prunus.models import example_inputs, tiny

# arch -> (MLP producers, MLP consumer, MLP width) by the last two components of their weight names
MLP = {
    "llama": (["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj", 128),
    "mistral": (["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj", 128),
    "qwen2": (["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj", 128),
    "gpt2": (["mlp.c_fc"], "mlp.c_proj", 256),
    "opt": (["0.fc1", "1.fc1"], None, 128),
    "bert": (["intermediate.dense"], "output.dense", 128),
    "vit": (["mlp.fc1"], "mlp.fc2", 128),
}
MLP_MODULE = {"llama": "model.layers.{i}.mlp", "gpt2": "transformer.h.{i}.mlp", "opt": "model.decoder.layers.{i}",
              "bert": "encoder.layer.{i}", "vit": "vit.layers.{i}.mlp"}
# arch -> (units, query heads per unit, producer count, literals rewritten per layer)
HEADS = {"llama": (2, 2, 3, 4), "mistral": (2, 2, 3, 4), "qwen2": (2, 2, 3, 4), "gpt2": (4, 1, 1, 3),
         "opt": (4, 1, 3, 3), "bert": (4, 1, 3, 0), "vit": (4, 1, 3, 0)}


def _short(member):
    return ".".join(member.weight.target.split(".")[-3:-1])


def test_channel_groups(arch, tiny_models):
    model, x = tiny_models(arch)
    graph = capture(model, x)
    found = graph.analysis("channel_groups")
    assert found.unsupported == []
    producers, consumer, width = MLP[arch]
    assert [g.layer for g in found.mlp] == [0, 1]
    for i, g in enumerate(found.mlp):
        assert g.kind == "mlp" and g.units == width
        assert g.module == MLP_MODULE.get(arch, MLP_MODULE["llama"]).format(i=i)
        names = [_short(m) for m in g.producers]
        assert names == ([f"{i}.fc1"] if arch == "opt" else producers)
        assert [_short(m) for m in g.consumers] == ([f"{i}.fc2"] if arch == "opt" else [consumer])
        for m in g.members:
            assert tuple(m.index.shape) == (width, 1)
            w = graph.get_attr_value(m.weight)
            assert w.shape[m.dim] == width
        # biases travel with their producer rows
        assert all((m.bias is not None) == (arch not in ("llama", "mistral", "qwen2")) for m in g.producers)
        # GPT-2's Conv1D is addmm over flattened tokens: the views to and from [batch*seq, 256] name the width
        assert [n.args[p][q] if q is not None else n.args[p] for n, p, q in g.literals] == \
            ([256, 256] if arch == "gpt2" else [])
    units, per_unit, n_prod, n_literals = HEADS[arch]
    assert [g.layer for g in found.heads] == [0, 1]
    for g in found.heads:
        assert (g.units, g.heads_per_unit, len(g.producers), len(g.literals)) == (units, per_unit, n_prod, n_literals)
        assert g.consumers[0].node is g.site.o_proj
        # every member covers its whole weight dim exactly once
        for m in g.members:
            assert m.index.numel() == graph.get_attr_value(m.weight).shape[m.dim]
            assert torch.equal(m.index.flatten().sort().values, torch.arange(m.index.numel()))
        assert tuple(g.consumers[0].index.shape) == (units, 16 * per_unit)
    if arch == "gpt2":  # fused c_attn: each head owns its q, k and v rows, 64 apart
        index = found.heads[0].producers[0].index
        assert index[1].tolist() == [c + s for s in (0, 64, 128) for c in range(16, 32)]
    if arch == "llama":  # GQA: expand [b, 2, 2, s, 16] changes at the KV axis only, reshape [b, 4, s, 16] too
        sizes = sorted((n.target.__name__.split(".")[0], n.args[p][q]) for n, p, q in found.heads[0].literals)
        assert sizes == [("expand", 2), ("expand", 2), ("reshape", 4), ("reshape", 4)]
        assert all(q == 1 for _, _, q in found.heads[0].literals)


class SharedHidden(torch.nn.Module):
    """An MLP whose hidden activations also leave the model: its neurons cannot be removed."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.down(h), h


class PerHeadGate(torch.nn.Module):
    """Separate q/k/v with a learned per-head gate on the attention output (it varies along the head axis)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.gate = torch.nn.Parameter(torch.rand(heads, 1, 1))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v) * self.gate
        return x + self.o(a.transpose(1, 2).reshape(b, s, d))


def test_unprunable_groups_are_reported_with_the_node():
    graph = capture(SharedHidden().eval(), (torch.randn(2, 8),))
    found = graph.analysis("channel_groups")
    assert found.mlp == []
    assert [(kind, reason) for kind, _, reason in found.unsupported] == \
        [("mlp", "pruned channels reach a graph output")]
    graph = capture(PerHeadGate().eval(), (torch.randn(2, 5, 32),))
    found = graph.analysis("channel_groups")
    assert found.heads == []
    (kind, node, reason), = found.unsupported
    assert kind == "heads" and node.startswith("mul") and "varies along the pruned axis" in reason


class FusedViewQKV(torch.nn.Module):
    """Explicit attention whose single qkv projection is split by a view and a permute, not by split."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.o = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
        return x + self.o((att @ v).transpose(1, 2).reshape(b, s, d))


def test_fused_qkv_without_split_is_unsupported():
    graph = capture(FusedViewQKV().eval(), (torch.randn(2, 5, 32),))
    found = graph.analysis("channel_groups")
    assert found.heads == []
    assert [reason for _, _, reason in found.unsupported] == ["fused qkv projection without a split into q, k and v"]


def test_gpt2_deeper_and_wider_keeps_one_group_per_layer():
    model = tiny("gpt2", n_layer=3, n_inner=96)
    graph = capture(model, example_inputs(model))
    found = graph.analysis("channel_groups")
    assert [(g.layer, g.units) for g in found.mlp] == [(0, 96), (1, 96), (2, 96)]
    assert [g.layer for g in found.heads] == [0, 1, 2]
