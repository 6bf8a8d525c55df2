"""attention_sites and blocks on every tiny architecture, at a depth of 3 so layer indices are checked."""
import pytest
import torch

from prunus.ir import capture
from prunus.models import example_inputs, tiny

LAYERS = 3
DEPTH = {"gpt2": "n_layer"}
# Where each architecture's projections live, relative to its layer module.
PROJ = {
    "llama": ("model.layers.{i}.self_attn.{p}_proj", "qkvo"),
    "mistral": ("model.layers.{i}.self_attn.{p}_proj", "qkvo"),
    "qwen2": ("model.layers.{i}.self_attn.{p}_proj", "qkvo"),
    "opt": ("model.decoder.layers.{i}.self_attn.{p}_proj", "qkvo"),  # o is out_proj
    "gpt2": None,
    "bert": None,
    "vit": ("vit.layers.{i}.attention.{p}_proj", "qkvo"),
}
HEADS = {"llama": (4, 2), "mistral": (4, 2), "qwen2": (4, 2), "gpt2": (4, 4), "opt": (4, 4), "bert": (4, 4),
         "vit": (4, 4)}


@pytest.fixture(scope="module")
def deep_graphs():
    cache = {}

    def get(arch):
        if arch not in cache:
            model = tiny(arch, **{DEPTH.get(arch, "num_hidden_layers"): LAYERS})
            cache[arch] = capture(model, example_inputs(model))
        return cache[arch]

    return get


def _weight_name(graph, node):
    from prunus.ir.ops import weight_of

    return weight_of(graph, node).target


def test_attention_sites(arch, deep_graphs):
    graph = deep_graphs(arch)
    sites = graph.analysis("attention_sites")
    assert [s.layer for s in sites] == list(range(LAYERS))
    heads, kv_heads = HEADS[arch]
    for i, s in enumerate(sites):
        assert (s.num_heads, s.num_kv_heads, s.head_dim) == (heads, kv_heads, 16)
        assert s.rope == (arch in ("llama", "mistral", "qwen2"))
        assert bool(s.gqa_repeat) == (kv_heads < heads)
        assert all(p is not None for p in (s.q_proj, s.k_proj, s.v_proj, s.o_proj))
        assert s.fused_qkv == (arch == "gpt2")
        names = {p: _weight_name(graph, getattr(s, f"{p}_proj")) for p in "qkvo"}
        if arch == "gpt2":
            assert names["q"] == f"transformer.h.{i}.attn.c_attn.weight"
            assert names["o"] == f"transformer.h.{i}.attn.c_proj.weight"
        elif arch == "bert":
            assert names["q"] == f"encoder.layer.{i}.attention.self.query.weight"
            assert names["v"] == f"encoder.layer.{i}.attention.self.value.weight"
            assert names["o"] == f"encoder.layer.{i}.attention.output.dense.weight"
        else:
            template, _ = PROJ[arch]
            for p in "qkvo":
                short = "out" if (arch, p) == ("opt", "o") else p
                assert names[p] == template.format(i=i, p=short) + ".weight"
    assert graph.analysis("attention_sites") is sites  # cached
    graph.invalidate()
    assert graph.analysis("attention_sites") is not sites


def test_blocks(arch, deep_graphs):
    graph = deep_graphs(arch)
    blocks = graph.analysis("blocks")
    assert [(b.layer, b.kind) for b in blocks] == [(i, k) for i in range(LAYERS) for k in ("attention", "mlp")]
    sites = graph.analysis("attention_sites")
    for b in blocks:
        assert b.exit.target == torch.ops.aten.add.Tensor
        assert b.entry in b.exit.args or b.branch in b.exit.args
        holds_attention = any(s.node in b.body for s in sites)
        assert holds_attention == (b.kind == "attention")
    # consecutive blocks chain through the residual stream: each block's input descends from the previous exit
    for prev, nxt in zip(blocks, blocks[1:]):
        seen, stack = set(), [nxt.entry]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        assert prev.exit in seen


class ExplicitAttention(torch.nn.Module):
    """Hand-written attention as matmul -> softmax -> matmul, two layers, no Hugging Face."""

    def __init__(self, dim=32, heads=4, layers=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.out = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))
        self.mlp = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x):
        b, s, d = x.shape
        for qkv, out, mlp in zip(self.qkv, self.out, self.mlp):
            q, k, v = qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
            x = x + out((att @ v).transpose(1, 2).reshape(b, s, d))
            x = x + mlp(x).relu()
        return x


def test_explicit_attention_and_blocks_without_module_indices():
    torch.manual_seed(0)
    graph = capture(ExplicitAttention().eval(), (torch.randn(2, 5, 32),))
    sites = graph.analysis("attention_sites")
    assert [(s.layer, s.kind, s.num_heads, s.head_dim) for s in sites] == [(0, "explicit", 4, 8), (1, "explicit", 4, 8)]
    assert sites[0].fused_qkv and sites[0].o_proj is not None and not sites[0].rope
    assert [(b.layer, b.kind) for b in graph.analysis("blocks")] == [(0, "attention"), (0, "mlp"), (1, "attention"),
                                                                      (1, "mlp")]


def test_model_without_attention_has_no_sites():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8)).eval()
    graph = capture(mlp, (torch.randn(2, 8),))
    assert graph.analysis("attention_sites") == []
    assert graph.analysis("blocks") == []
