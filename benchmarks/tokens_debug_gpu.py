import torch, prunus, traceback
m = prunus.models.shape("llama-3-8b", num_hidden_layers=2, vocab_size=1024)
x = (torch.randint(0, 1024, (1, 16), device="cuda"),)
try:
    with torch.device("cuda"):
        opt = prunus.optimize(m, "simplify_masks, drop_tokens(keep=0.5, after_layer=1)", example_inputs=x, verify=False)
    print(opt(torch.randint(0, 1024, (1, 300), device="cuda")).logits.shape)
except Exception as e:
    print(str(e)[:2500])
    c = e.__cause__
    print("CAUSE", type(c), str(c)[:2500])
