"""Per-head KV policies on tiny llama (2 layers, 4 query / 2 KV heads, head dim 16): adakv (ragged lengths),
think (pruned key channels), duo (retrieval and streaming heads). Every decode step is checked against a
reference that keeps the full cache and masks attention to the entries (and key channels) the policy kept."""
import copy
import json

import pytest
import torch

import prunus
from prunus.passes.kv import KVCache, KVDecoder, KVQuant
from prunus.passes.kv.cache import KVCacheParams, kv_bytes_per_token
from prunus.passes.kv.duo import ANSWER_TOKENS, retrieval_heads, synthetic_passkey
from prunus.passes.kv.runtime import resolve_spec
from prunus.passes.kv.storage import HeadGroupCache, RaggedLayerCache
from tests.passes.kv.conftest import kv_decoder

ops = torch.ops.prunus
LAYERS, HK, D, BATCH = 2, 2, 16, 2


def _ids(s, seed=0):
    return torch.randint(0, 256, (BATCH, s), generator=torch.Generator().manual_seed(seed))


def _kept(cache, n: int) -> torch.Tensor:
    """[b, hk, n]: which positions a layer's cache holds, whatever its layout."""
    if isinstance(cache, HeadGroupCache):
        out = torch.zeros(cache.groups[0].k.shape[0], cache.num_heads, n, dtype=torch.bool)
        for heads, group in zip(cache.heads, cache.groups):
            out[:, heads] = _kept(group, n)
        return out
    pos = cache.pos.masked_fill(cache.pos < 0, n)  # ragged padding
    return torch.zeros(*pos.shape[:2], n + 1, dtype=torch.bool).scatter(2, pos, True)[..., :n]


def _masked_attention(mask, channels=None, pruned=None):
    """Attention over the full past restricted to `mask` [b, hk, n]; for the entries `pruned` [b, hk, n], q.k over
    the key channels `channels` [b, hk, d_kept] only (the other channels of q zeroed)."""
    def attend(q, k_past, v_past, k_new, v_new, scale, past_lengths=None):
        b, h, t, d = q.shape
        n, group = k_past.shape[2], h // k_past.shape[1]
        k = torch.cat([k_past, k_new], 2).repeat_interleave(group, 1)
        v = torch.cat([v_past, v_new], 2).repeat_interleave(group, 1)
        logits = q @ k.transpose(-1, -2) * scale
        if channels is not None:
            keep = torch.zeros(b, k_past.shape[1], d, dtype=torch.bool).scatter(2, channels, True)
            q_kept = q * keep.repeat_interleave(group, 1)[:, :, None, :]
            narrow = torch.cat([pruned, torch.zeros(b, pruned.shape[1], t, dtype=torch.bool)], -1)
            logits = torch.where(narrow.repeat_interleave(group, 1)[:, :, None, :],
                                 q_kept @ k.transpose(-1, -2) * scale, logits)
        past = mask.repeat_interleave(group, 1)[:, :, None, :].expand(b, h, t, n)
        causal = torch.ones(t, t, dtype=torch.bool).tril().expand(b, h, t, t)
        logits = logits.masked_fill(~torch.cat([past, causal], -1), float("-inf"))
        return torch.softmax(logits, -1) @ v
    return attend


def _pruned(cache, n: int):
    """[b, hk, n]: the entries a ChannelCache holds with pruned keys (None for other layouts)."""
    if not hasattr(cache, "k_recent"):
        return None
    pos = cache.pos[..., :cache.k.shape[2]]
    return torch.zeros(*pos.shape[:2], n, dtype=torch.bool).scatter(2, pos, True)


class MaskedReference:
    """The full cache, decoded by the plain decode graph with every attention masked to what `dec` keeps."""

    def __init__(self, graph, ids):
        self.full = KVDecoder(graph, {"policy": "full"})
        self.prefill_logits = self.full.feed(ids)

    def step(self, ids, dec):
        n = self.full.position
        fns = [_masked_attention(_kept(c, n), getattr(c, "channels", None), _pruned(c, n)) for c in dec.caches]
        g = copy.deepcopy(self.full.graphs.decode.graph)
        for node, fn in zip(g.find_nodes(op="call_function", target=ops.decode_attention.default), fns, strict=True):
            node.target = fn
        gm = torch.fx.GraphModule(self.full.graphs.decode, g)
        flat = [x for c in self.full.caches for x in c.graph_inputs()]
        out = list(gm(ids, torch.arange(n, n + ids.shape[1]), *flat))
        kv = out[self.full.graphs.num_outputs:]
        pos = torch.arange(n, n + ids.shape[1]).expand(BATCH, HK, ids.shape[1])
        for c, k, v in zip(self.full.caches, kv[0::2], kv[1::2]):
            c.append(k, v, pos)
        self.full.position += ids.shape[1]
        return self.full._logits(out)


def _check_against_reference(opt, dec, prompt=40, steps=(1, 1, 2, 1, 1)):
    """Prefill, then decode `steps` tokens at a time; every step's logits equal the masked reference's."""
    ids = _ids(prompt + sum(steps), seed=1)
    ref = MaskedReference(opt.graph, ids[:, :prompt])
    torch.testing.assert_close(dec.feed(ids[:, :prompt]), ref.prefill_logits)
    at, seen = prompt, []
    for t in steps:
        want = ref.step(ids[:, at:at + t], dec)
        torch.testing.assert_close(dec.feed(ids[:, at:at + t]), want, rtol=1e-5, atol=1e-5)
        at += t
        seen.append([h.clone() for h in dec.head_lengths()])
    return seen


def test_adakv_shares_the_layer_budget_across_heads(llama_kv):
    model, opt = llama_kv
    dec = kv_decoder(opt, policy="adakv", budget=12, sink=2, window=4)
    assert any(n.name == "past_lengths_0" for n in dec.graphs.decode.graph.nodes)
    seen = _check_against_reference(opt, dec)  # the ragged layout is exact: attention masked to the kept entries
    for lengths in seen:
        assert all(torch.equal(per_head.sum(-1), torch.full((BATCH,), 12 * HK)) for per_head in lengths)
    assert any(len(set(per_head.flatten().tolist())) > 1 for lengths in seen for per_head in lengths)
    for cache in dec.caches:
        assert isinstance(cache, RaggedLayerCache) and cache.length == int(cache.lengths.max())
        assert int(cache.lengths.min()) >= int(0.2 * 12)  # Ada-KV's floor
        for b in range(BATCH):
            for h in range(HK):
                held = cache.pos[b, h, :cache.lengths[b, h]].tolist()
                assert held == sorted(held) and {0, 1, 42, 43, 44, 45} <= set(held)  # sinks + window, in order
                assert (cache.pos[b, h, cache.lengths[b, h]:] == -1).all()
    # allocated = longest head x heads; held = exactly budget x heads per layer and sequence
    entry = 2 * D * 4
    assert dec.held_bytes() == LAYERS * BATCH * 12 * HK * entry
    assert dec.cache_bytes() == sum(BATCH * HK * c.length * entry for c in dec.caches) >= dec.held_bytes()
    full = KVDecoder(opt.graph)
    full.feed(_ids(46))
    assert dec.cache_bytes() < 0.5 * full.cache_bytes()


def test_adakv_appends_at_each_heads_end():
    k = torch.arange(6.0).view(1, 2, 3, 1)
    pos = torch.arange(3).expand(1, 2, 3)
    from prunus.passes.kv.storage import LayerCache

    cache = RaggedLayerCache(LayerCache(k, k, pos, torch.zeros(1, 2, 3)),
                             torch.tensor([[[True, False, True], [True, True, True]]]))
    assert cache.lengths.tolist() == [[2, 3]] and cache.pos.tolist() == [[[0, 2, -1], [0, 1, 2]]]
    cache.append(torch.full((1, 2, 1, 1), 9.0), torch.full((1, 2, 1, 1), 9.0), torch.full((1, 2, 1), 3),
                 torch.zeros(1, 2, 1))
    assert cache.lengths.tolist() == [[3, 4]] and cache.pos.tolist() == [[[0, 2, 3, -1], [0, 1, 2, 3]]]
    assert cache.k[0, :, :, 0].tolist()[0][:3] == [0.0, 2.0, 9.0] and cache.k[0, 1, 3, 0] == 9.0


@pytest.mark.parametrize("budget", [None, 16])
def test_think_prunes_key_channels(llama_kv, budget):
    model, opt = llama_kv
    dec = kv_decoder(opt, policy="think", key_ratio=0.25, budget=budget, sink=2, window=4)
    names = [n.name for n in dec.graphs.decode.graph.nodes if n.op == "placeholder"]
    assert names[2:6] == ["k_past_0", "k_recent_0", "v_past_0", "k_channels_0"]
    # q.k over the kept channels only (q's other channels zeroed) for entries older than the window
    seen = _check_against_reference(opt, dec)
    n = 46 if budget is None else budget
    assert all(torch.equal(per_head, torch.full((BATCH, HK), n)) for per_head in seen[-1])
    for cache in dec.caches:
        assert tuple(cache.k.shape) == (BATCH, HK, n - 4, 4) and tuple(cache.k_recent.shape) == (BATCH, HK, 4, D)
        assert tuple(cache.v.shape) == (BATCH, HK, n, D) and tuple(cache.channels.shape) == (BATCH, HK, 4)
        assert all(len(set(row.tolist())) == 4 for row in cache.channels.flatten(0, 1))
        assert (cache.pos[..., n - 4:] == torch.arange(42, 46)).all()  # the window keeps every channel
    assert dec.cache_bytes() == LAYERS * BATCH * HK * ((n - 4) * 4 + 4 * D + n * D) * 4


def test_think_channels_score_window_queries_times_key_norms(llama_kv):
    _, opt = llama_kv
    dec = kv_decoder(opt, policy="think", sink=0, window=5)
    ids = _ids(30)
    g = dec.graphs
    out = g.prefill(ids, torch.arange(30))
    keys, norms = out[g.num_outputs:g.num_outputs + 2 * LAYERS:2], out[-LAYERS:]
    dec.feed(ids)
    for cache, k, q in zip(dec.caches, keys, norms):
        assert tuple(q.shape) == (BATCH, 4, D)
        group_q = q.view(BATCH, HK, 2, D).pow(2).sum(2).sqrt()
        want = (group_q * k.norm(dim=2)).topk(8, dim=-1).indices.sort(-1).values
        assert torch.equal(cache.channels, want)
        torch.testing.assert_close(cache.k, k[:, :, :25].gather(3, want[:, :, None, :].expand(BATCH, HK, 25, 8)))
        torch.testing.assert_close(cache.k_recent, k[:, :, 25:])


def test_pruned_keys_op_is_attention_with_zeroed_channels():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8,
                                                                                                        generator=g)
    k_new, v_new = torch.randn(2, 2, 3, 8, generator=g), torch.randn(2, 2, 3, 8, generator=g)
    channels = torch.randn(2, 2, 8, generator=g).topk(3, dim=-1).indices.sort(-1).values
    out, probs = ops.decode_attention_pruned_keys(q, channels, k[:, :, :6].gather(
        3, channels[:, :, None, :].expand(2, 2, 6, 3)), k[:, :, 6:], v, k_new, v_new, 0.3)
    keep = torch.zeros(2, 2, 8, dtype=torch.bool).scatter(2, channels, True)
    k_ref = torch.cat([k[:, :, :6] * keep[:, :, None, :], k[:, :, 6:]], 2)  # zeroed key channels == zeroed q's
    want, want_probs = ops.decode_attention_scores(q, k_ref, v, k_new, v_new, 0.3)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(probs, want_probs)


def test_duo_classifies_heads_once_and_streams_the_others(tiny_models, tmp_path):
    model, ex = tiny_models("llama")
    opt = prunus.optimize(model, passes="kv_cache(policy=duo, sink=2, window=4, retrieval=0.5)", example_inputs=ex)
    spec = opt.graph.kv
    heads = spec["retrieval_heads"]
    assert sum(map(len, heads)) == 2 and all(h == sorted(h) for h in heads)  # half of the 4 KV heads
    assert json.loads(json.dumps(spec)) == spec
    assert any("duo retrieval heads" in n for n in opt.report[-1].notes)
    assert retrieval_heads(opt.graph, spec)[0] == heads  # deterministic
    dec = KVDecoder(opt.graph)
    seen = _check_against_reference(opt, dec)
    for layer, per_head in enumerate(seen[-1]):
        for h in range(HK):
            assert (per_head[:, h] == (46 if h in heads[layer] else 6)).all()
    for layer, cache in enumerate(dec.caches):
        for group_heads, group in zip(cache.heads, cache.groups):
            want = list(range(46)) if group_heads == heads[layer] else [0, 1, 42, 43, 44, 45]
            assert sorted(group.pos[0, 0].tolist()) == want  # in-place eviction: any order
    retrieval = sum(map(len, heads))
    assert dec.cache_bytes() == BATCH * (retrieval * 46 + (LAYERS * HK - retrieval) * 6) * 2 * D * 4
    opt.save(str(tmp_path / "art"))
    loaded = prunus.load(str(tmp_path / "art"))
    assert loaded.graph.kv == spec
    ids = _ids(30)
    assert torch.equal(prunus.generate(loaded, ids, 5), prunus.generate(opt, ids, 5))


def test_duo_profiling_task():
    ids, starts = synthetic_passkey(256, sink=2, window=4)
    for row, a in zip(ids, starts.tolist()):
        assert a >= 2 and a + 16 <= ids.shape[1] - 4 - ANSWER_TOKENS  # needle outside the sinks and the window
        assert torch.equal(row[-ANSWER_TOKENS:], row[a:a + ANSWER_TOKENS])
    assert torch.equal(synthetic_passkey(256, 2, 4)[0], ids)


@pytest.fixture
def with_spec(llama_kv):
    """Set the fixture graph's KV spec for one test (as the kv_cache pass records it), restored after."""
    _, opt = llama_kv
    kept = opt.graph.kv

    def use(spec):
        opt.graph.kv = spec
        return opt

    yield use
    opt.graph.kv = kept


@pytest.mark.parametrize("params,layer_bytes", [
    (dict(policy="adakv", budget=12, sink=2, window=4), lambda n, retrieval: HK * 12 * 2 * D),
    (dict(policy="think", key_ratio=0.25), lambda n, retrieval: HK * ((n - 32) * 4 + 32 * D + n * D)),
    (dict(policy="duo", sink=2, window=4, retrieval=0.25),
     lambda n, retrieval: (retrieval * n + (HK - retrieval) * 6) * 2 * D),
])
def test_generate_and_report_the_smaller_cache(llama_kv, with_spec, params, layer_bytes):
    model, opt = llama_kv
    with_spec(None)
    result = KVCache(**params).run(opt.graph, prunus.passes.PassContext(example_inputs=list(opt.graph.example_inputs)))
    assert opt.graph.kv == resolve_spec(opt.graph, KVCacheParams(**params).spec()) and result.notes
    ids = _ids(40)
    out, stats = prunus.generate(opt, ids, 6, return_stats=True)
    _, full = prunus.generate(model, ids, 6, return_stats=True)
    assert out.shape == (BATCH, 46) and stats["kv_bytes"] < full["kv_bytes"] == LAYERS * BATCH * HK * 45 * 2 * D * 4
    heads = opt.graph.kv.get("retrieval_heads", [[]] * LAYERS)
    per_token = sum(layer_bytes(4096, len(h)) * 4 for h in heads) / 4096
    assert kv_bytes_per_token(opt.graph) == round(per_token)  # the report's kv_bytes_after
    if params["policy"] != "adakv":  # adakv's allocation depends on its longest head
        assert stats["kv_bytes"] == BATCH * sum(layer_bytes(45, len(h)) * 4 for h in heads)


@pytest.mark.parametrize("spec,match", [
    ("kv_cache(policy=snapkv, budget=64, key_ratio=0.5)", "key_ratio prunes key channels under policy think"),
    ("kv_cache(policy=h2o, budget=64, retrieval=0.5)", "does not apply to policy h2o"),
    ("kv_cache(policy=think, key_ratio=0)", "out of range"),
    ("kv_cache(policy=think, key_ratio=1.5)", "out of range"),
    ("kv_cache(policy=duo, retrieval=1.5)", "out of range"),
    ("kv_cache(policy=think, window=0, sink=0)", "window must be >= 1"),
    ("kv_cache(policy=adakv)", "needs a budget"),
    ("kv_cache(policy=adakv, budget=10, sink=4, window=8)", "below sink \\+ window"),
])
def test_spec_errors(spec, match):
    with pytest.raises(prunus.SpecError, match=match):
        prunus.passes.build_pipeline(spec)


@pytest.mark.parametrize("params", [dict(policy="adakv", budget=64), dict(policy="think"), dict(policy="duo")])
def test_quantized_storage_is_refused(llama_kv, with_spec, params):
    _, opt = llama_kv
    ctx = prunus.passes.PassContext(example_inputs=list(opt.graph.example_inputs))
    with_spec(KVCacheParams(**params).spec())
    with pytest.raises(prunus.PassError, match="kv_quant.*rectangular"):
        KVQuant(bits=8).run(opt.graph, ctx)
    with_spec({"policy": "full", "quant": {"bits": 8, "group_size": 8, "residual": 4}})
    with pytest.raises(prunus.PassError, match="kv_cache.*rectangular"):
        KVCache(**params).run(opt.graph, ctx)


def test_kvzip_scores_entries_by_the_prompts_reconstruction(llama_kv):
    """kvzip keeps the entries the prompt, fed again after itself, attends to most: the reference is the
    attention of the second copy's queries over the first copy in an eager forward of [ids, ids]."""
    model, opt = llama_kv
    ids = _ids(30)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = eager(torch.cat([ids, ids], 1), output_attentions=True).attentions
    dec = kv_decoder(opt, policy="kvzip", budget=12, sink=2, window=4)
    dec.feed(ids)
    for cache, a in zip(dec.caches, att):
        received = a[:, :, 30:, :30].sum(2).view(BATCH, HK, 2, 30).sum(2)  # over queries and the group's heads
        pos = torch.arange(30)
        ranked = received.masked_fill((pos < 2) | (pos >= 26), float("inf"))
        assert torch.equal(cache.pos, ranked.topk(12, dim=-1).indices.sort(-1).values)
