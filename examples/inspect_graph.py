"""Look inside a captured graph: the ops of one layer, its attention sites and residual blocks."""
import torch

import prunus
from prunus.models import example_inputs, tiny

model = tiny("llama", num_hidden_layers=2)
graph = prunus.ir.capture(model, example_inputs(model))

text = prunus.ir.to_text(graph)                       # one line per op, grouped by module, symbolic shapes
section = ""
for line in text.splitlines():                        # print the ops of layer 0's attention
    if not line.startswith("  "):
        section = line
    if "layers.0.self_attn" in section:
        print(line)

for site in graph.analysis("attention_sites"):        # q/k/v/o projections, RoPE, GQA, mask, layer index
    print(f"layer {site.layer}: {site.kind} attention, {site.num_heads} heads / {site.num_kv_heads} kv heads, "
          f"head_dim {site.head_dim}, rope={site.rope}, q={site.q_proj.name}, o={site.o_proj.name}")

for block in graph.analysis("blocks"):                # residual blocks: entry, exit (the add), kind
    print(f"layer {block.layer} {block.kind:9s} block: {block.entry.name} -> {block.exit.name} ({block.module})")

opt = prunus.optimize(model, "simplify_masks", example_inputs=example_inputs(model))
sdpa = [n for n in opt.graph.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
print("after simplify_masks:", [dict(is_causal=n.args[5], mask=n.args[3]) for n in sdpa])
