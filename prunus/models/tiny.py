"""Small random-initialised models of many architectures, for tests (seeded, eval mode)."""
from __future__ import annotations

import torch

# Each entry: (config class, model class, default config). Sizes are small enough for CPU tests but keep
# the features that matter to the passes: GQA (llama, mistral, qwen2), biases (qwen2, gpt2, opt, bert),
# fused qkv (gpt2), post-norm (bert), patches and a class token (vit).
_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=512, word_embed_proj_dim=64)),
    "bert": ("BertConfig", "BertModel",
             dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512)),
    "vit": ("ViTConfig", "ViTForImageClassification",
            dict(image_size=32, patch_size=8, num_channels=3, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_labels=10)),
}

ARCHS = tuple(_ARCHS)


def tiny(arch: str, *, seed: int = 0, **config) -> torch.nn.Module:
    """A random-initialised `arch` model (see `ARCHS`) in eval mode; `config` overrides its config."""
    import transformers

    if arch not in _ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHS)}")
    cfg_name, model_name, defaults = _ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(**{**defaults, **config})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    return model.eval()


def example_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 8, *, seed: int = 0) -> tuple:
    """Positional inputs for a zoo model: token ids, or pixel values for vision models."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    if hasattr(cfg, "image_size"):
        return (torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=gen),)
    return (torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen),)
