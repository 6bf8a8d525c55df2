"""Full-size random-weight models for GPU speed benchmarks (no weights are downloaded or carried)."""
from __future__ import annotations

import torch

SHAPES = {
    "llama-3-8b": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5)),
    "llama-3.2-1b": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True)),
    "qwen2.5-7b": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6)),
}


def shape(name: str, *, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
          **config) -> torch.nn.Module:
    """A full-size `name` model (see `SHAPES`) with random weights, built directly on `device` in `dtype`."""
    import transformers

    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    cfg_name, model_name, defaults = SHAPES[name]
    cfg = getattr(transformers, cfg_name)(**{**defaults, **config})
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(transformers, model_name)(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
