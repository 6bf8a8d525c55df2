"""KV-cache rewriting: explicit prefill/decode graphs, eviction and quantization policies."""
