"""Shared by the KV tests: the tiny llama through kv_cache once per module, and decoders under explicit specs."""
import pytest

import prunus
from prunus.passes.kv import KVDecoder
from prunus.passes.kv.cache import KVCacheParams


@pytest.fixture(scope="module")
def llama_kv(tiny_models):
    """tiny llama through kv_cache once; policies are tried on its graph with `kv_decoder`."""
    model, ex = tiny_models("llama")
    return model, prunus.optimize(model, passes="kv_cache", example_inputs=ex)


def kv_decoder(opt, **params):
    """A KV decoder for the graph under the policy `kv_cache(**params)` would record."""
    return KVDecoder(opt.graph, KVCacheParams(**params).spec())
