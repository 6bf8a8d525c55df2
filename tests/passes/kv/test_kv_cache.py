import pytest
import torch

import prunus
from prunus.passes.kv import KVDecoder
from prunus.passes.kv.policies import POLICIES
from prunus.passes.kv.rewrite import build_kv_graphs
from prunus.passes.kv.storage import LayerCache, gather_rows
from tests.passes.kv.conftest import kv_decoder

DECODERS = ["llama", "mistral", "qwen2", "gpt2", "opt"]


def _ids(model, b=2, s=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (b, s), generator=g)


@pytest.mark.parametrize("arch", DECODERS)
def test_full_policy_decodes_exactly(tiny_models, arch):
    model, ex = tiny_models(arch)
    opt = prunus.optimize(model, passes="kv_cache", example_inputs=ex)
    ids = _ids(model)
    with torch.no_grad():
        full = model(ids).logits
    dec = KVDecoder(opt.graph)
    got = [dec.feed(ids[:, :9]), dec.feed(ids[:, 9:12])] + [dec.feed(ids[:, i:i + 1]) for i in range(12, 24)]
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=1e-4, atol=1e-4)
    assert dec.cache_lengths() == [24] * len(dec.graphs.layers)
    # greedy generation through the KV graphs is the original model's greedy output
    assert torch.equal(prunus.generate(opt, ids[:, :10], 12), prunus.generate(model, ids[:, :10], 12))


def test_graph_interfaces(tiny_models):
    model, ex = tiny_models("llama")
    opt = prunus.optimize(model, passes="kv_cache", example_inputs=ex)
    g = build_kv_graphs(opt.graph, prefill_window=4, decode_probs=True)
    n_layers = model.config.num_hidden_layers
    kv, d = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    assert [p.name for p in g.prefill.graph.nodes if p.op == "placeholder"] == ["input_ids", "positions"]
    names = [p.name for p in g.decode.graph.nodes if p.op == "placeholder"]
    assert names[:2] == ["input_ids", "positions"] and len(names) == 2 + 2 * n_layers
    out = g.prefill(_ids(model, s=7), torch.arange(7))
    keys = out[g.num_outputs:g.num_outputs + 2 * n_layers]
    assert all(tuple(k.shape) == (2, kv, 7, d) for k in keys)  # per KV head, before the GQA repeat
    scores = out[g.num_outputs + 2 * n_layers:]
    assert len(scores) == n_layers and tuple(scores[0].shape) == (2, kv, 7)
    # the 4 observing queries spend one unit of attention per query head: 4 * heads per group
    torch.testing.assert_close(scores[0].sum(-1), torch.full((2, kv), 4.0 * model.config.num_attention_heads / kv))
    step = g.decode(_ids(model, s=1), torch.tensor([7]), *keys)
    probs = step[g.num_outputs + 2 * n_layers:]
    assert tuple(probs[0].shape) == (2, kv, 8)


def _run(dec, ids, new=16):
    dec.feed(ids)
    lengths = [dec.cache_lengths()]
    for i in range(new):
        dec.feed(ids[:, i % ids.shape[1]:i % ids.shape[1] + 1])
        lengths.append(dec.cache_lengths())
    return dec, lengths


# policies whose heads all keep the same entries count (adakv and duo: test_kv_policies_extra.py)
UNIFORM = sorted(p for p, cls in POLICIES.items() if p != "full" and not (cls.ragged or cls.grouped))


@pytest.mark.parametrize("policy", UNIFORM)
def test_policies_bound_the_cache(llama_kv, policy):
    model, opt = llama_kv
    ids = _ids(model, s=40)
    dec, lengths = _run(kv_decoder(opt, policy=policy, budget=20, sink=2, window=6), ids)
    budgets = dec.policy.budgets
    assert all(n <= b for step in lengths for n, b in zip(step, budgets))
    assert lengths[0] == budgets  # the 40-token prompt was compressed to the budget at prefill end
    full = KVDecoder(opt.graph)
    full.feed(ids)
    assert dec.cache_bytes() < full.cache_bytes() * 0.6
    for cache in dec.caches:  # sinks and the recent window always survive
        pos = cache.pos[0, 0]
        assert set(range(2)) <= set(pos.tolist()) and set(range(56 - 6, 56)) <= set(pos.tolist())
        assert len(set(pos.tolist())) == len(pos)  # each position once (in-place eviction leaves them unordered)


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv"])
def test_in_place_eviction_keeps_what_append_and_shrink_keep(llama_kv, policy, monkeypatch):
    """At the budget, a step overwrites the evicted slot (LayerCache.replace); the copying path it replaces
    (append the new entry, keep the top `budget`) must keep the same entries with the same values."""
    model, opt = llama_kv
    ids = _ids(model, s=40)
    calls, in_place = [], LayerCache.replace
    monkeypatch.setattr(LayerCache, "replace", lambda self, *a: calls.append(1) or in_place(self, *a))
    fast, lengths = _run(kv_decoder(opt, policy=policy, budget=20, sink=2, window=6), ids)
    assert all(n == 20 for step in lengths for n in step)
    assert len(calls) == 16 * len(fast.caches)  # every decode step of every layer went through replace

    def copying(self, k, v, pos, score, sink, recent_from, decay=1.0, add=None):
        n = self.length
        if decay == 0:
            self.score = add.float()
        elif decay != 1 or add is not None:
            self.score = (self.score * decay + (0 if add is None else add)).float()
        score = pos.float() if score is None else score
        ranked = self.score.masked_fill((self.pos < sink) | (self.pos >= recent_from), float("inf"))
        self.append(k, v, pos, score)
        self.shrink(torch.cat([ranked, torch.full_like(ranked[..., :1], float("inf"))], dim=-1), n)

    monkeypatch.setattr(LayerCache, "replace", copying)
    slow, _ = _run(kv_decoder(opt, policy=policy, budget=20, sink=2, window=6), ids)
    for a, b in zip(fast.caches, slow.caches, strict=True):
        ia, ib = a.pos.argsort(dim=-1), b.pos.argsort(dim=-1)
        assert torch.equal(a.pos.gather(2, ia), b.pos.gather(2, ib))
        torch.testing.assert_close(gather_rows(a.k, ia), gather_rows(b.k, ib), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gather_rows(a.v, ia), gather_rows(b.v, ib), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.score.gather(2, ia), b.score.gather(2, ib), rtol=1e-5, atol=1e-5)


def test_streaming_keeps_sinks_and_recent(llama_kv):
    model, opt = llama_kv
    dec, _ = _run(kv_decoder(opt, policy="streaming", sink=3, window=9), _ids(model, s=30), new=5)
    assert dec.policy.budget == 12
    expected = list(range(3)) + list(range(35 - 9, 35))
    assert all(sorted(c.pos[b, h].tolist()) == expected
               for c in dec.caches for b in range(2) for h in range(c.pos.shape[1]))


def test_snapkv_keeps_what_the_window_attends(llama_kv):
    model, opt = llama_kv
    ids = _ids(model, s=30)
    dec = kv_decoder(opt, policy="snapkv", budget=12, sink=0, window=4, pool=1)
    g = dec.graphs
    out = g.prefill(ids, torch.arange(30))
    scores = out[g.num_outputs + 2 * len(g.layers):]
    dec.feed(ids)
    for cache, s in zip(dec.caches, scores):
        top = s[..., :26].topk(8, dim=-1).indices.sort(-1).values  # 8 best of the older entries + the window
        expected = torch.cat([top, torch.arange(26, 30).expand(*top.shape[:2], 4)], dim=-1)
        assert torch.equal(cache.pos, expected)


def test_tova_keeps_what_the_last_query_attends_averaged_over_heads(llama_kv):
    model, opt = llama_kv
    ids = _ids(model, s=30)
    dec = kv_decoder(opt, policy="tova", budget=10, sink=0, window=0)
    g = dec.graphs
    out = g.prefill(ids, torch.arange(30))
    scores = out[g.num_outputs + 2 * len(g.layers):]
    dec.feed(ids)
    for cache, s in zip(dec.caches, scores):
        mean = s[..., :29].mean(dim=1)  # [b, 29]: the last query's attention, mean over KV heads
        top = mean.topk(9, dim=-1).indices.sort(-1).values
        expected = torch.cat([top, torch.full_like(top[:, :1], 29)], dim=-1)  # the newest is protected
        assert torch.equal(cache.pos, expected[:, None].expand_as(cache.pos))  # every head keeps the same
    dec.feed(ids[:, :1])  # even with window 0 the newest entry is protected for its first step
    assert all(bool((c.pos == 30).any(-1).all()) for c in dec.caches)


def test_slack_evicts_every_slack_plus_one_tokens(llama_kv):
    model, opt = llama_kv
    ids = _ids(model, s=50)
    dec, lengths = _run(kv_decoder(opt, policy="snapkv", budget=40, slack=3), ids, new=12)
    assert all(len(set(x)) == 1 for x in lengths)  # every layer alike
    assert [x[0] for x in lengths] == [40] + [41, 42, 43, 40] * 3  # prefill to the budget, then every 4th token
    ada = kv_decoder(opt, policy="adakv", budget=40, slack=3)  # per-head budgets: the layer total grows by hk a step
    ada.feed(ids)
    hk = ada.caches[0].k.shape[1]
    held = []
    for i in range(8):
        ada.feed(ids[:, i:i + 1])
        held.append(int(ada.caches[0].head_lengths().sum(-1).max()))
    assert held == [hk * n for n in (41, 42, 43, 40)] * 2


def test_chunkkv_keeps_whole_chunks_shared_by_heads(llama_kv):
    model, opt = llama_kv
    dec = kv_decoder(opt, policy="chunkkv", budget=24, sink=0, window=4, chunk=5, reuse=2)
    dec.feed(_ids(model, s=44))
    for cache in dec.caches:
        pos = cache.pos[0, 0].tolist()
        older = [p for p in pos if p < 40]
        assert all(p // 5 * 5 + j in older for p in older for j in range(5)), pos  # whole chunks of 5
        assert torch.equal(cache.pos, cache.pos[:, :1].expand_as(cache.pos))  # every head the same chunks
    assert torch.equal(dec.caches[0].pos, dec.caches[1].pos)  # layers 0 and 1 share one selection


def test_pyramid_budgets_shrink_with_depth(llama_kv):
    model, opt = llama_kv
    dec = kv_decoder(opt, policy="pyramidkv", budget=40, sink=2, window=4)
    dec.feed(_ids(model, s=60))
    budgets = dec.policy.budgets
    assert budgets[0] > budgets[-1] and sum(budgets) == pytest.approx(40 * len(budgets), abs=len(budgets))


def test_budget_above_context_is_a_noop(tiny_models):
    model, ex = tiny_models("llama")
    opt = prunus.optimize(model, passes="kv_cache(policy=h2o, budget=64, sink=2, window=4)", example_inputs=ex)
    assert any("nothing is evicted" in n for n in opt.report[-1].notes)
    ids = _ids(model, s=20)
    assert torch.equal(prunus.generate(opt, ids, 10), prunus.generate(model, ids, 10))


def test_report_states_kv_bytes(tiny_models):
    model, ex = tiny_models("llama")
    opt = prunus.optimize(model, passes="kv_cache(policy=streaming, budget=256, sink=4, window=32)",
                          example_inputs=ex)
    record = opt.report[-1]
    cfg = model.config
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads * 4
    assert record.kv_bytes_before == per_token
    assert record.kv_bytes_after == round(per_token * 256 / 4096)  # stated at a 4096-token context
    _, stats = prunus.generate(opt, _ids(model, s=300), 3, return_stats=True)
    assert stats["kv_bytes"] == 2 * 256 * per_token  # batch 2, budget 256 entries


@pytest.mark.parametrize("spec,match", [
    ("kv_cache(policy=h2o, budget=10, sink=4, window=8)", "below sink \\+ window"),
    ("kv_cache(policy=snapkv)", "needs a budget"),
    ("kv_cache(policy=full, budget=64)", "keeps every entry"),
    ("kv_cache(policy=full, slack=8)", "evicts nothing"),
    ("kv_cache(policy=snapkv, budget=64, slack=-1)", "slack"),
    ("kv_cache(policy=h2o, budget=64, ratio=0.5)", "at most one"),
    ("kv_cache(policy=nope)", "accepted"),
])
def test_spec_errors(spec, match):
    with pytest.raises(prunus.SpecError, match=match):
        prunus.passes.build_pipeline(spec)


def test_encoder_is_rejected(tiny_models):
    model, ex = tiny_models("bert")
    with pytest.raises(prunus.PassError, match="encoder"):
        prunus.optimize(model, passes="kv_cache", example_inputs=ex)
