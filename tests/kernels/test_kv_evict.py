"""In-place eviction at a full KV cache (`kernels.kv_evict`): the Triton kernel against the torch reference, exactly
(CPU: under TRITON_INTERPRET=1, small shapes, fp32; CUDA: the real kernel)."""
import pytest
import torch

from prunus.kernels import kv_evict
from prunus.passes.kv import storage
from prunus.passes.kv.policies import H2O
from prunus.passes.kv.storage import LayerCache
from tests.conftest import CUDA, DEVICE, needs_kernels

pytestmark = needs_kernels


@pytest.fixture(scope="module")
def ke():
    from prunus.kernels import kv_evict_triton
    return kv_evict_triton


def make(n, seed, b=2, hk=2, d=16):
    """A full cache (score, pos, k, v) whose scores take 3 values (ties everywhere) over positions 0..n-1 in any
    order, and a new entry at position n."""
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 3, (b, hk, n), generator=g).float()
    pos = torch.stack([torch.randperm(n, generator=g) for _ in range(b * hk)]).view(b, hk, n)
    cache = [score, pos, torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d, generator=g)]
    new = [torch.randn(b, hk, 1, d, generator=g), torch.randn(b, hk, 1, d, generator=g),
           torch.full((b, hk, 1), n), torch.randn(b, hk, 1, generator=g)]
    return [x.to(DEVICE) for x in cache], [x.to(DEVICE) for x in new]


def reference(cache, new, sink, recent_from):
    out = [x.clone() for x in cache]
    kv_evict.replace_lowest_reference(*out, *new, sink, recent_from)
    return out


def assert_equal(got, expected):
    for name, a, b in zip(("score", "pos", "k", "v"), got, expected, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("n", [7, 64, 300])
@pytest.mark.parametrize("block_n", [None, 16])
@pytest.mark.parametrize("sink", [0, 2])
def test_kernel_matches_reference(ke, n, block_n, sink):
    cache, new = make(n, seed=n)
    recent_from = n - 3
    expected = reference(cache, new, sink, recent_from)
    ke.replace_lowest(*cache, *new, sink, recent_from, block_n=block_n)
    assert_equal(cache, expected)
    assert (cache[1] == n).sum() == 4  # one slot per (sequence, head) took the new entry


@pytest.mark.parametrize("block_n", [None, 16])
def test_first_unprotected_minimum_wins(ke, block_n):
    """Lower scores on the sinks (positions 0, 1) and the recent window are skipped; of the two equal minima
    elsewhere (slots 40 and 250, in different blocks of 16), the first takes the new entry."""
    n = 300
    cache, new = make(n, seed=1)
    score, pos = cache[0], cache[1]
    pos.copy_(torch.arange(n).flip(0))  # slot j holds position n - 1 - j
    score.fill_(1.0)
    score[..., [40, 250]] = 0.0
    score[..., [n - 1, n - 2, 0, 3]] = -5.0  # positions 0, 1 (sinks) and n - 1, n - 4 (recent)
    expected = reference(cache, new, 2, n - 4)
    assert (expected[1][..., 40] == n).all()
    ke.replace_lowest(*cache, *new, 2, n - 4, block_n=block_n)
    assert_equal(cache, expected)


def test_all_protected_takes_slot_zero(ke):
    cache, new = make(7, seed=2)
    expected = reference(cache, new, 0, 0)
    assert (expected[1][..., 0] == 7).all()
    ke.replace_lowest(*cache, *new, 0, 0)
    assert_equal(cache, expected)


def test_strided_tensors(ke):
    """The cache as views into wider or permuted storage, the new entry broadcast (stride 0) or sliced."""
    n, d = 64, 16
    cache, new = make(n, seed=3)
    wide = torch.zeros(2, 2, n, 2 * d, device=DEVICE)
    k, v = wide[..., :d], wide[..., d:]
    k.copy_(cache[2])
    v.copy_(cache[3])
    score, pos = (torch.empty(n, 2, 2, dtype=x.dtype, device=DEVICE).permute(2, 1, 0).copy_(x) for x in cache[:2])
    new_k = torch.cat([new[0], new[0]], dim=-1)[..., :d]
    new_pos = torch.tensor([n], device=DEVICE).expand(2, 2, 1)
    new_score = new[3][:, :1].expand(2, 2, 1)
    expected = reference(cache, [new_k, new[1], new_pos, new_score], 2, n - 3)
    ke.replace_lowest(score, pos, k, v, new_k, new[1], new_pos, new_score, 2, n - 3)
    assert_equal([score, pos, k, v], expected)


def test_layer_cache_replace_runs_the_kernel_on_broadcast_prefill_bookkeeping(ke, monkeypatch):
    """The prefill's positions are one arange broadcast over sequences and heads (shared by the layers):
    `replace` gives the cache its own copy before the kernel writes into it."""
    n = 64
    cache, new = make(n, seed=4)
    shared = torch.arange(n, device=DEVICE)
    by_ref = LayerCache(cache[2].clone(), cache[3].clone(), shared.expand(2, 2, n), cache[0].clone())
    by_ref.replace(*new, 2, n - 3)
    monkeypatch.setattr(storage, "replace_lowest", ke.replace_lowest)
    by_kernel = LayerCache(cache[2], cache[3], shared.expand(2, 2, n), cache[0])
    by_kernel.replace(*new, 2, n - 3)
    assert torch.equal(shared, torch.arange(n, device=DEVICE))
    assert_equal([by_kernel.score, by_kernel.pos, by_kernel.k, by_kernel.v],
                 [by_ref.score, by_ref.pos, by_ref.k, by_ref.v])


def test_layer_cache_replace_leaves_a_shared_contiguous_view_alone():
    """Batch 1, one KV head: the prefill's positions are a contiguous view of one arange that every layer's
    cache shares; a replace in one layer must not move another layer's positions."""
    n = 16
    shared = torch.arange(n, device=DEVICE)
    caches = [LayerCache(torch.randn(1, 1, n, 4, device=DEVICE), torch.randn(1, 1, n, 4, device=DEVICE),
                         shared.view(1, 1, n), torch.rand(1, 1, n, device=DEVICE)) for _ in range(2)]
    assert caches[0].pos.is_contiguous() and caches[0].pos._base is shared
    new = [torch.randn(1, 1, 1, 4, device=DEVICE), torch.randn(1, 1, 1, 4, device=DEVICE),
           torch.full((1, 1, 1), n, device=DEVICE), torch.zeros(1, 1, 1, device=DEVICE)]
    caches[0].replace(*new, 0, n)
    assert (caches[0].pos == n).sum() == 1
    assert torch.equal(caches[1].pos.flatten(), torch.arange(n, device=DEVICE))
    assert torch.equal(shared, torch.arange(n, device=DEVICE))


def test_h2o_decode_steps_with_the_kernel(ke, monkeypatch):
    """Prefill eviction then decode steps at the budget (`Policy.after_step` -> `LayerCache.replace`): the
    kernel keeps exactly what the reference keeps, step after step, over layers of different head counts."""
    b, s, d, steps = 2, 30, 16, 5
    heads = [2, 4]

    def run():
        g = torch.Generator().manual_seed(5)
        rand = lambda *shape: torch.rand(*shape, generator=g).to(DEVICE)  # noqa: E731
        policy = H2O(budget=20, sink=2, window=4, num_layers=len(heads))
        pos = torch.arange(s, device=DEVICE)
        caches = [LayerCache(rand(b, hk, s, d), rand(b, hk, s, d), pos.expand(b, hk, s)) for hk in heads]
        policy.after_prefill(caches, [rand(b, hk, s) for hk in heads], s)
        for step in range(steps):
            policy.after_step(caches, [(rand(b, hk, 1, d), rand(b, hk, 1, d)) for hk in heads],
                              [rand(b, hk, 21) for hk in heads], s + step + 1)
        return caches

    expected = run()
    calls = []
    monkeypatch.setattr(storage, "replace_lowest", lambda *a: calls.append(1) or ke.replace_lowest(*a))
    got = run()
    assert len(calls) == steps * len(heads)
    for got, ref in zip(got, expected, strict=True):
        assert got.length == 20
        assert_equal([got.score, got.pos, got.k, got.v], [ref.score, ref.pos, ref.k, ref.v])


@pytest.mark.parametrize("decay, with_add", [(0.75, True), (1.0, True), (0.0, True), (0.5, False)])
@pytest.mark.parametrize("block_n", [None, 16])
def test_score_update_in_the_scan(ke, decay, with_add, block_n):
    """The step's score update (score * decay + add, add alone at decay 0) written back in the ranking pass, add
    a bf16 slice of a wider tensor (the decode graph's probabilities); the new entry scored by its position."""
    n = 300
    cache, new = make(n, seed=8)
    g = torch.Generator().manual_seed(9)
    wide = (torch.randint(0, 4, (2, 2, n + 1), generator=g) * 0.25).to(torch.bfloat16).to(DEVICE)
    add = wide[..., :n] if with_add else None
    expected = [x.clone() for x in cache]
    kv_evict.replace_lowest_reference(*expected, *new[:3], None, 2, n - 3, decay, add)
    ke.replace_lowest(*cache, *new[:3], None, 2, n - 3, decay, add, block_n=block_n)
    assert_equal(cache, expected)
    slot = (cache[1] == n).nonzero()[:, 2].view(2, 2, 1)  # the new entry's slot: scored by its position
    assert torch.equal(cache[0].gather(2, slot), torch.full((2, 2, 1), float(n), device=DEVICE))


@pytest.mark.parametrize("name", ["streaming", "h2o", "tova", "snapkv", "vatp", "knorm"])
def test_fused_decode_update_keeps_what_the_unfused_step_keeps(ke, monkeypatch, name):
    """At the budget a policy's `decode_update` runs inside the eviction kernel; the same steps through
    `decode_score`, append and shrink (no in-place path) keep the same entries with the same scores."""
    from prunus.passes.kv.policies import POLICIES, Policy

    b, s, d, steps, budget = 2, 30, 16, 4, 20
    heads = [2, 4]

    def run():
        g = torch.Generator().manual_seed(6)
        rand = lambda *shape: torch.rand(*shape, generator=g).to(DEVICE)  # noqa: E731
        policy = POLICIES[name](budget=budget, sink=2, window=4, num_layers=len(heads))
        pos = torch.arange(s, device=DEVICE)
        caches = [LayerCache(rand(b, hk, s, d), rand(b, hk, s, d), pos.expand(b, hk, s)) for hk in heads]
        policy.after_prefill(caches, [rand(b, hk, s) for hk in heads], s)
        for step in range(steps):
            # each entry's probability a function of its position: the two paths hold entries in other slots
            probs = [torch.cat([torch.sin(c.pos * 1.7 + step).abs(), torch.full((b, c.pos.shape[1], 1), 0.5,
                                                                                 device=DEVICE)], dim=-1)
                     for c in caches] if policy.decode_probs else None
            policy.after_step(caches, [(rand(b, hk, 1, d), rand(b, hk, 1, d)) for hk in heads], probs,
                              s + step + 1)
        return caches

    monkeypatch.setattr(storage, "replace_lowest", ke.replace_lowest)
    fused = run()
    with monkeypatch.context() as m:
        m.setattr(Policy, "_in_place", lambda *a: False)
        unfused = run()
    for got, ref in zip(fused, unfused, strict=True):
        assert got.length == ref.length == budget
        order, ref_order = got.pos.argsort(-1), ref.pos.argsort(-1)
        for a, r in ((got.pos, ref.pos), (got.score, ref.score)):
            torch.testing.assert_close(a.gather(2, order), r.gather(2, ref_order), rtol=1e-6, atol=0)
        for a, r in ((got.k, ref.k), (got.v, ref.v)):
            idx, ref_idx = (o[..., None].expand(*o.shape, d) for o in (order, ref_order))
            assert torch.equal(a.gather(2, idx), r.gather(2, ref_idx))


def test_decay_zero_needs_scores_to_add(ke):
    cache, new = make(8, seed=1)
    for fn in (kv_evict.replace_lowest_reference, ke.replace_lowest):
        with pytest.raises(ValueError, match="decay 0"):
            fn(*cache, *new, 0, 8, 0.0, None)


def test_decode_scores_keep_each_policy_rule():
    """Each policy's step scores, written out as the policy defines them (not through `decode_update`)."""
    from prunus.passes.kv.policies import POLICIES

    g = torch.Generator().manual_seed(3)
    b, hk, n, d = 2, 4, 10, 8
    cache = LayerCache(torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d, generator=g),
                       torch.arange(n).expand(b, hk, n), torch.rand(b, hk, n, generator=g))
    probs_old, probs_new = torch.rand(b, hk, n, generator=g), torch.rand(b, hk, 1, generator=g)
    k_new, v_new = torch.randn(b, hk, 1, d, generator=g), torch.randn(b, hk, 1, d, generator=g)
    pos_new = torch.full((b, hk, 1), n)
    decay = 1 - 1 / 8
    expected = {
        "streaming": (cache.score, pos_new.float()),
        "h2o": (cache.score + probs_old, probs_new),
        "tova": (probs_old.mean(1, keepdim=True).expand_as(probs_old), probs_new.mean(1, keepdim=True).expand_as(
            probs_new)),
        "snapkv": (cache.score * decay + probs_old, probs_new),
        "vatp": (cache.score * decay + probs_old * cache.v.abs().sum(-1), probs_new * v_new.abs().sum(-1)),
        "knorm": (cache.score, -k_new.norm(dim=-1)),
    }
    for name, (old, fresh) in expected.items():
        policy = POLICIES[name](budget=8, sink=1, window=8, num_layers=1)
        got_old, got_fresh = policy.decode_score(0, cache, probs_old, k_new, v_new, probs_new, pos_new)
        torch.testing.assert_close(got_old, old, msg=name)
        torch.testing.assert_close(got_fresh, fresh, msg=name)


def test_a_policy_with_its_own_decode_score_is_not_bypassed(monkeypatch):
    """A subclass overriding `decode_score` only keeps its rule at the budget (no inherited `decode_update`)."""
    from prunus.passes.kv.policies import SnapKV

    class Inverted(SnapKV):
        def decode_score(self, i, cache, probs_old, k_new, v_new, probs_new, pos_new):
            return -cache.score - probs_old, -probs_new

    b, hk, s, d = 1, 2, 12, 4
    g = torch.Generator().manual_seed(2)
    policy = Inverted(budget=8, sink=1, window=2, num_layers=1)
    caches = [LayerCache(torch.randn(b, hk, s, d, generator=g), torch.randn(b, hk, s, d, generator=g),
                         torch.arange(s).expand(b, hk, s))]
    policy.after_prefill(caches, [torch.rand(b, hk, s, generator=g)], s)
    before = caches[0].score.clone()
    probs = torch.rand(b, hk, 9, generator=g)
    policy.after_step(caches, [(torch.randn(b, hk, 1, d, generator=g), torch.randn(b, hk, 1, d, generator=g))],
                      [probs], s + 1)
    kept = caches[0].pos != s  # the entries that were there before the step
    assert torch.equal(caches[0].score[kept].sort().values, (-before - probs[..., :8])[kept].sort().values)
