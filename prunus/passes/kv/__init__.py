"""KV-cache rewriting: explicit prefill/decode graphs, eviction and quantization policies."""
from prunus.passes.kv.cache import KVCache, kv_bytes_per_token
from prunus.passes.kv.quant import KVQuant
from prunus.passes.kv.runtime import KVDecoder

__all__ = ["KVCache", "KVDecoder", "KVQuant", "kv_bytes_per_token"]
