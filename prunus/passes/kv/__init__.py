"""KV-cache rewriting: explicit prefill/decode graphs, eviction and quantization policies."""
from prunus.passes.kv.cache import KVCache, kv_bytes_per_token
from prunus.passes.kv.runtime import KVDecoder

__all__ = ["KVCache", "KVDecoder", "kv_bytes_per_token"]
