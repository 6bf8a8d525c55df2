"""drop_tokens followed by kv_cache (LazyLLM-style prefill dropping, then decoding): deeper layers cache the kept
tokens only, at their true positions, and decode steps match the original model whose deeper layers attend to
the kept prompt tokens and the decoded ones only (attention masked per layer)."""
import pytest
import torch

import prunus
from prunus.errors import PassError
from prunus.models import example_inputs, tiny
from prunus.passes.kv import KVDecoder
from prunus.passes.kv.cache import KVCacheParams

DROP = "drop_tokens(method=attention, keep=0.5, after_layer=1)"


@pytest.fixture(scope="module")
def llama():
    model = tiny("llama", num_hidden_layers=4)
    return model, example_inputs(model, seq=24)


@pytest.fixture(scope="module")
def dropped(llama):
    model, x = llama
    return prunus.optimize(model, f"{DROP}, kv_cache", example_inputs=x, verify=False)


def _ids(model, b=2, s=20, seed=3):
    return torch.randint(0, model.config.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


def _masked_reference(model, ids, prompt: int, kept: list) -> torch.Tensor:
    """The original model on all of `ids` where layer i's queries see only keys at `kept[i]` [b, n] positions
    of the prompt, or past it (decoded tokens), causally."""
    b, n = ids.shape
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    masks = []
    for pos in kept:
        visible = torch.zeros(b, n, dtype=torch.bool)
        visible[:, prompt:] = True
        visible.scatter_(1, pos, True)
        masks.append(causal & visible[:, None, None, :])

    def hook(module, args, kwargs):
        kwargs["attention_mask"] = masks[module.layer_idx]
        return args, kwargs

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def _kept(dec) -> list:
    """Per layer, the prompt positions its cache holds, [b, n] (the same for every KV head)."""
    return [c.pos[:, 0] for c in dec.caches]


def test_prefill_caches_kept_tokens_and_decode_matches_masked_reference(llama, dropped):
    model, _ = llama
    ids, s = _ids(model, s=24), 20
    dec = KVDecoder(dropped.graph)
    first = dec.feed(ids[:, :s])
    kept = _kept(dec)
    k = s - s // 2
    assert dec.cache_lengths() == [s, k, k, k]
    assert torch.equal(kept[0], torch.arange(s).expand(2, s))
    assert all(torch.equal(kept[1], p) for p in kept[2:])
    # the deeper layers keep the sinks and the last token, in order
    assert bool((kept[1][:, :4] == torch.arange(4)).all()) and bool((kept[1][:, -1] == s - 1).all())
    assert bool((kept[1].diff(dim=-1) > 0).all())
    # the prefill is the token-dropping forward on the prompt (its logits: the kept tokens')
    with torch.no_grad():
        torch.testing.assert_close(first, dropped.graph.run_flat([ids[:, :s]])[0], rtol=0, atol=0)
    steps = [dec.feed(ids[:, i:i + 1]) for i in range(s, 24)]
    assert dec.cache_lengths() == [24, k + 4, k + 4, k + 4]
    # new entries sit at the prompt length onwards, not at the number of kept tokens
    assert torch.equal(dec.caches[1].pos[:, 0, k:], torch.arange(s, 24).expand(2, 4))
    ref = _masked_reference(model, ids, s, kept)
    torch.testing.assert_close(torch.cat(steps, dim=1), ref[:, s:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first[:, -1], ref[:, s - 1], rtol=1e-4, atol=1e-4)
    # dropping matters: the undropped model decodes differently
    with torch.no_grad():
        assert (model(ids).logits[:, s:] - ref[:, s:]).abs().max() > 1e-3


def test_cache_bytes_shrink_by_the_dropped_entries(llama, dropped):
    model, x = llama
    plain = prunus.optimize(model, "kv_cache", example_inputs=x, verify=False)
    ids, s = _ids(model), 20
    full, drop = KVDecoder(plain.graph), KVDecoder(dropped.graph)
    full.feed(ids)
    drop.feed(ids)
    hk, d = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    per_entry = 2 * ids.shape[0] * hk * d * 4  # keys and values, fp32
    assert full.cache_bytes() == 4 * s * per_entry
    assert drop.cache_bytes() == (s + 3 * (s - s // 2)) * per_entry
    assert full.cache_bytes() - drop.cache_bytes() == 3 * (s // 2) * per_entry
    # the report's bytes per token of context: layers after the drop point hold half the prompt
    per_token = 2 * hk * d * 4
    assert plain.report[-1].kv_bytes_after == 4 * per_token
    assert dropped.report[-1].kv_bytes_after == per_token + 3 * per_token // 2


def test_greedy_generation(llama, dropped):
    model, _ = llama
    ids = _ids(model, s=12)
    out = prunus.generate(dropped, ids, 6)
    assert out.shape == (2, 18) and torch.equal(out[:, :12], ids)
    # the same tokens by hand: prefill, then each greedy token through the decode graph
    dec = KVDecoder(dropped.graph)
    logits, tokens = dec.feed(ids), []
    for _ in range(6):
        tokens.append(logits[:, -1].argmax(-1, keepdim=True))
        logits = dec.feed(tokens[-1])
    assert torch.equal(out[:, 12:], torch.cat(tokens, dim=1))


def test_progressive_schedule_caches_per_stage(llama):
    model, x = llama
    opt = prunus.optimize(model, "drop_tokens(method=attention, schedule=[[1, 0.6], [3, 0.3]]), kv_cache",
                          example_inputs=x, verify=False)
    ids, s = _ids(model, s=24), 20
    dec = KVDecoder(opt.graph)
    dec.feed(ids[:, :s])
    kept = _kept(dec)
    assert dec.cache_lengths() == [20, 12, 12, 6]
    assert bool(torch.isin(kept[3][0], kept[1][0]).all())  # the second point keeps a subset of the first's
    steps = [dec.feed(ids[:, i:i + 1]) for i in range(s, 24)]
    ref = _masked_reference(model, ids, s, kept)
    torch.testing.assert_close(torch.cat(steps, dim=1), ref[:, s:], rtol=1e-4, atol=1e-4)


def test_composes_with_snapkv_budget(llama):
    model, x = llama
    opt = prunus.optimize(model, f"{DROP}, kv_cache(policy=snapkv, budget=8, sink=2, window=2)", example_inputs=x,
                          verify=False)
    assert opt.graph.kv["policy"] == "snapkv"
    ids, s = _ids(model, s=24), 20
    dec = KVDecoder(opt.graph)
    dec.feed(ids[:, :s])
    assert dec.cache_lengths() == [8] * 4
    undropped = KVDecoder(opt.graph, {"policy": "full"})
    undropped.feed(ids[:, :s])
    kept = _kept(undropped)
    # snapkv evicts among what the drop kept: deeper layers hold kept prompt positions only
    assert all(bool(torch.isin(c.pos[0, h], kept[1][0]).all()) for c in dec.caches[1:] for h in range(c.pos.shape[1]))
    for i in range(s, 24):
        assert torch.isfinite(dec.feed(ids[:, i:i + 1])).all()
    assert dec.cache_lengths() == [8] * 4
    assert bool((dec.caches[2].pos == 23).any(-1).all())  # the newest entry is at its true position
    assert prunus.generate(opt, ids[:, :12], 4).shape == (2, 16)
    assert KVDecoder(opt.graph, KVCacheParams(policy="snapkv", budget=8, sink=2, window=2).spec()).graphs.stages \
        == [0, 1, 1, 1]


def test_gemfilter_caches_the_selection_in_every_layer(llama):
    model, x = llama
    opt = prunus.optimize(model, "drop_tokens(method=gemfilter, keep=0.5, after_layer=2), kv_cache",
                          example_inputs=x, verify=False)
    dec = KVDecoder(opt.graph)
    ids, s = _ids(model, s=24), 20
    dec.feed(ids[:, :s])
    assert dec.cache_lengths() == [10] * 4  # the scoring copy of the first layers caches nothing
    kept = _kept(dec)
    steps = [dec.feed(ids[:, i:i + 1]) for i in range(s, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), _masked_reference(model, ids, s, kept)[:, s:],
                               rtol=1e-4, atol=1e-4)


def test_errors(llama):
    model, x = llama
    with pytest.raises(PassError, match="tome"):  # merging: refused for causal models already
        prunus.optimize(model, "drop_tokens(method=tome, keep=0.5, after_layer=1), kv_cache", example_inputs=x,
                        verify=False)
    bert = tiny("bert")
    for method, match in (("attention", "encoder-only"), ("tome", "merged token")):
        with pytest.raises(PassError, match=match):
            prunus.optimize(bert, f"drop_tokens(method={method}, keep=0.5, after_layer=1), kv_cache",
                            example_inputs=example_inputs(bert), verify=False)
