"""kv_quant: decoding over a KIVI-style quantized cache on tiny llama: error against the full model, exact byte
counts, the residual flush rule, composition with every eviction policy, generation, pipelines and errors."""
import pytest
import torch

import prunus
from prunus.kernels import kv_quant as kq
from prunus.kernels.decode_attention import decode_attention_reference
from prunus.passes.kv import KVDecoder
from prunus.passes.kv.cache import KVCacheParams
from prunus.passes.kv.policies import POLICIES
from prunus.passes.kv.quantized import QuantizedLayerCache

ops = torch.ops.prunus


def _ids(s, b=2, seed=0):
    return torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama_kv(tiny_models):
    """tiny llama through kv_quant alone (which gives it kv_cache's full cache first); the tests decode its graph
    under explicit specs."""
    model, ex = tiny_models("llama")
    return model, prunus.optimize(model, passes="kv_quant(bits=8, group_size=8, residual=4)", example_inputs=ex)


FULL = {"policy": "full"}


def _spec(bits=4, group_size=8, residual=4, **policy):
    return {**KVCacheParams(**policy).spec(), "quant": {"bits": bits, "group_size": group_size, "residual": residual}}


def _stream(dec, ids, prompt):
    """Prefill `prompt` tokens, then decode the rest one by one: logits of every position."""
    got = [dec.feed(ids[:, :prompt])] + [dec.feed(ids[:, i:i + 1]) for i in range(prompt, ids.shape[1])]
    return torch.cat(got, dim=1)


def test_kv_quant_alone_then_kv_cache(llama_kv):
    """kv_quant without a policy quantizes the full cache; a kv_cache pass after it keeps the quantized storage."""
    model, opt = llama_kv
    quant = {"bits": 8, "group_size": 8, "residual": 4}
    assert opt.graph.kv["policy"] == "full" and opt.graph.kv["quant"] == quant
    assert any("no kv_cache policy before" in n for n in opt.report[-1].notes)
    _, stats = prunus.generate(opt, _ids(30), 3, return_stats=True)
    assert stats["kv_bytes"] == _expected_bytes(32, 8, 8, 4)
    kept = opt.graph.kv
    try:
        ctx = prunus.passes.PassContext(example_inputs=list(opt.graph.example_inputs))
        prunus.passes.kv.KVCache(policy="streaming", window=8).run(opt.graph, ctx)
        assert opt.graph.kv["policy"] == "streaming" and opt.graph.kv["quant"] == quant
    finally:
        opt.graph.kv = kept


def test_decoding_error_against_the_full_model(llama_kv):
    model, opt = llama_kv
    ids = _ids(45)
    with torch.no_grad():
        full = model(ids).logits
    errors = {}
    for bits in (8, 4):
        dec = KVDecoder(opt.graph, _spec(bits))
        err = (_stream(dec, ids, 13) - full).abs().max() / full.abs().max()
        assert dec.caches[0].n_quantized == 40  # (45 - 4) // 8 groups of 8 quantized, 5 in the residual
        errors[bits] = err.item()
    assert errors[8] < 5e-3 and errors[4] < 0.08 and errors[4] > 2 * errors[8]
    # a residual longer than the sequence quantizes nothing: exactly the full cache
    dec = KVDecoder(opt.graph, _spec(4, residual=64))
    torch.testing.assert_close(_stream(dec, ids, 13), full, rtol=1e-4, atol=1e-4)
    assert dec.caches[0].n_quantized == 0


def test_decode_graph_reads_the_packed_cache(llama_kv):
    _, opt = llama_kv
    dec = KVDecoder(opt.graph, _spec(4, policy="h2o", budget=24, sink=2, window=4))
    targets = {n.target for n in dec.graphs.decode.graph.nodes}
    assert ops.decode_attention_quantized_scores.default in targets and ops.decode_attention.default not in targets
    names = [n.name for n in dec.graphs.decode.graph.nodes if n.op == "placeholder"]
    assert names[2:10] == ["k_q_0", "k_scale_0", "k_min_0", "v_q_0", "v_scale_0", "v_min_0", "k_res_0", "v_res_0"]
    assert KVDecoder(opt.graph, _spec(8)).graphs.decode.graph.find_nodes(
        op="call_function", target=ops.decode_attention_quantized.default)


def test_scores_op_matches_the_dequantized_cache():
    g = torch.Generator().manual_seed(1)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    k, v, q = rnd(1, 2, 32, 16), rnd(1, 2, 32, 16), rnd(1, 4, 2, 16)  # 4 query heads over 2 KV heads
    kr, vr, kn, vn = rnd(1, 2, 3, 16), rnd(1, 2, 3, 16), rnd(1, 2, 2, 16), rnd(1, 2, 2, 16)
    K, V = kq.quantize_keys(k, 4, 16), kq.quantize_values(v, 4, 16)
    out, probs = ops.decode_attention_quantized_scores(q, *K, *V, kr, vr, kn, vn, 0.25, 4, 16)
    torch.testing.assert_close(out, ops.decode_attention_quantized(q, *K, *V, kr, vr, kn, vn, 0.25, 4, 16))
    k_all = torch.cat([kq.dequantize_keys(*K, 4, 16), kr], 2)
    v_all = torch.cat([kq.dequantize_values(*V, 4, 16), vr], 2)
    torch.testing.assert_close(probs, decode_attention_reference(q, k_all, v_all, kn, vn, 0.25, return_probs=True)[1])
    assert probs.shape == (1, 2, 32 + 3 + 2)


def _expected_bytes(n, bits, group, residual, layers=2, hk=2, d=16, batch=2):
    """Hand count for tiny llama (fp32 cache, head dim 16, 2 KV heads): packed codes, bf16 scales + minimums."""
    n_q = max(0, (n - residual) // group * group)
    value_groups = d // min(group, d)
    per_head = n_q * 2 * d * bits // 8 + 2 * 2 * (n_q // group * d + n_q * value_groups) + (n - n_q) * 2 * d * 4
    return layers * batch * hk * per_head


@pytest.mark.parametrize("bits", [8, 4])
def test_cache_bytes_are_exact_and_shrink(llama_kv, bits):
    model, opt = llama_kv
    ids = _ids(70)
    dec, full = KVDecoder(opt.graph, _spec(bits, group_size=16, residual=0)), KVDecoder(opt.graph, FULL)
    dec.feed(ids), full.feed(ids)
    assert dec.cache_bytes() == _expected_bytes(70, bits, 16, 0)
    assert full.cache_bytes() == 2 * 2 * 2 * 70 * 2 * 16 * 4
    # 64 of 70 entries quantized, against fp32: 8 bits with bf16 scales ~2.7x smaller, 4 bits ~3.9x
    assert full.cache_bytes() / dec.cache_bytes() > (2.6 if bits == 8 else 3.8)
    for k_q in (c.k_q for c in dec.caches):
        assert k_q.dtype == torch.uint8 and tuple(k_q.shape) == (2, 2, 64, 16 * bits // 8)


@pytest.mark.parametrize("prompt", [5, 11, 16])
def test_residual_flushes_whole_groups(llama_kv, prompt):
    """After every feed: n_quantized = (n - residual) // G * G and entries stay in position order; in layer 0
    (whose keys do not depend on the cache) the quantized keys are the full cache's within half a step and the
    residual holds them exactly."""
    _, opt = llama_kv
    ids = _ids(prompt + 14)
    dec, ref = KVDecoder(opt.graph, _spec(4, group_size=8, residual=3)), KVDecoder(opt.graph, FULL)
    dec.feed(ids[:, :prompt]), ref.feed(ids[:, :prompt])
    seen = set()
    for i in range(prompt, ids.shape[1] + 1):
        n = i
        for c in dec.caches:
            assert c.length == n and c.n_quantized == max(0, (n - 3) // 8 * 8)
            assert torch.equal(c.pos, torch.arange(n).expand(2, 2, n))
        c, r = dec.caches[0], ref.caches[0]
        n_q = c.n_quantized
        half = c.k_scale.float().repeat_interleave(8, 2) / 2
        k_deq = kq.dequantize_keys(c.k_q, c.k_scale, c.k_min, 4, 8)
        assert ((k_deq - r.k[:, :, :n_q]).abs() <= half * 1.01 + 1e-6).all()
        assert torch.equal(c.k_res, r.k[:, :, n_q:])
        seen.add(dec.caches[0].n_quantized)
        if i < ids.shape[1]:
            dec.feed(ids[:, i:i + 1]), ref.feed(ids[:, i:i + 1])
    assert len(seen) >= 2  # decoding crossed a flush


@pytest.mark.parametrize("policy", sorted(p for p, cls in POLICIES.items() if p != "full" and cls.quantizable()))
def test_every_policy_composes_with_quantization(llama_kv, policy):
    model, opt = llama_kv
    ids = _ids(40)
    params = dict(policy=policy, budget=24, sink=2, window=4, chunk=5)
    dec, plain = KVDecoder(opt.graph, _spec(4, **params)), KVDecoder(opt.graph, KVCacheParams(**params).spec())
    dec.feed(ids), plain.feed(ids)
    assert dec.cache_lengths() == plain.cache_lengths()  # prefill: the policy's own selection
    assert all(torch.equal(c.pos, p.pos) for c, p in zip(dec.caches, plain.caches))
    for i in range(20):
        logits = dec.feed(ids[:, i:i + 1])
        plain.feed(ids[:, i:i + 1])
        assert torch.isfinite(logits).all()
        for c, budget in zip(dec.caches, dec.policy.budgets):
            assert c.length <= budget and c.n_quantized % 8 == 0
            assert torch.equal(c.pos, c.pos.sort(-1).values)
            assert set(range(2)) <= set(c.pos[0, 0].tolist()) and set(range(37 + i, 41 + i)) <= set(
                c.pos[0, 0].tolist())  # sinks and the recent window survive
    assert sum(c.n_quantized for c in dec.caches) > 0
    assert dec.cache_bytes() < 0.6 * plain.cache_bytes()


def test_quantized_cache_evicts_whole_groups():
    """Two groups and a residual; the lowest-scored unprotected group goes as a unit, untouched."""
    k, v = torch.randn(1, 1, 20, 4), torch.randn(1, 1, 20, 4)
    cache = QuantizedLayerCache(k, v, torch.arange(20).view(1, 1, 20), bits=8, group_size=8, residual=4)
    cache.flush()
    assert cache.n_quantized == 16
    first_group = cache.k_q[:, :, :8].clone()
    ranked = torch.arange(20.0).view(1, 1, 20)
    ranked[..., 8:16] = -1.0  # the second group is the least useful
    cache.shrink(ranked, 19)
    assert cache.length == 12 and cache.pos[0, 0].tolist() == list(range(8)) + [16, 17, 18, 19]
    assert torch.equal(cache.k_q, first_group)
    ranked = torch.full((1, 1, 12), float("inf"))  # every group protected: the residual gives way
    ranked[..., 9] = 0.0
    cache.shrink(ranked, 11)
    assert cache.pos[0, 0].tolist() == list(range(8)) + [16, 18, 19]


def test_pipeline_generate_report_and_save(tiny_models, tmp_path):
    model, ex = tiny_models("llama")
    opt = prunus.optimize(model, passes="kv_cache(policy=snapkv,budget=64),kv_quant(bits=4)", example_inputs=ex)
    assert opt.graph.kv["quant"] == {"bits": 4, "group_size": 32, "residual": 32}
    assert opt.graph.kv["policy"] == "snapkv" and opt.graph.kv["budget"] == 64
    record = opt.report[-1]
    assert record.name == "kv_quant" and any("relative logit error" in n for n in record.notes)
    # snapkv keeps 64 entries; 32 quantized (one key group; one value group per token) + a 32-entry residual
    per_layer_seq = 2 * (32 * 32 // 2 + 2 * 2 * (16 + 32) + 32 * 32 * 4)
    assert record.kv_bytes_after == round(2 * per_layer_seq / 4096)
    assert record.kv_bytes_before == round(2 * 2 * 64 * 32 * 4 / 4096)
    ids = _ids(100)
    out, stats = prunus.generate(opt, ids, 12, return_stats=True)
    assert out.shape == (2, 112) and torch.equal(out[:, :100], ids)
    assert stats["kv_bytes"] == 2 * 2 * per_layer_seq
    opt.save(str(tmp_path / "art"))  # the quantized storage is part of the saved KV spec
    loaded = prunus.load(str(tmp_path / "art"))
    assert loaded.graph.kv == opt.graph.kv
    again, stats_again = prunus.generate(loaded, ids, 12, return_stats=True)
    assert torch.equal(again, out) and stats_again["kv_bytes"] == stats["kv_bytes"]


@pytest.mark.parametrize("spec,match", [
    ("kv_quant(bits=3)", "accepted: one of 8, 4"),
    ("kv_quant(group_size=24)", "not a power of two"),
    ("kv_quant(residual=-1)", "out of range"),
])
def test_spec_errors(spec, match):
    with pytest.raises(prunus.SpecError, match=match):
        prunus.passes.build_pipeline(spec)


def test_pass_errors(tiny_models):
    model, ex = tiny_models("bert")
    with pytest.raises(prunus.PassError, match="kv_quant.*encoder"):
        prunus.optimize(model, passes="kv_quant", example_inputs=ex)
    narrow = prunus.models.tiny("llama", hidden_size=48)  # head dim 12: value groups of 8 do not divide it
    with pytest.raises(prunus.PassError, match="group_size 8 does not divide the value head dim 12"):
        prunus.optimize(narrow, passes="kv_quant(group_size=8)", example_inputs=prunus.models.example_inputs(narrow))
