"""decode_attention ops: the reference against SDPA on the concatenated, GQA-repeated cache; the Triton
flash-decoding kernels against the reference (CPU: under TRITON_INTERPRET=1, small shapes, fp32; CUDA: the real
kernels, bf16)."""
import pytest
import torch
import torch.nn.functional as F

from prunus.kernels import decode_attention as da
from tests.conftest import CUDA, DEVICE, needs_kernels, needs_cuda, SMALL_ATTENTION as SMALL

ops = torch.ops.prunus


def make(b, h, hk, t, n, d, dv=None, seed=0, dtype=torch.float32, lengths=False):
    g = torch.Generator().manual_seed(seed)
    dv = dv or d
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    past_lengths = torch.randint(0, n + 1, (b, hk), generator=g, dtype=torch.int32) if lengths else None
    if lengths:
        past_lengths[0, 0] = 0  # an empty head
        past_lengths[-1, -1] = n  # a full one
    return r(b, h, t, d), r(b, hk, n, d), r(b, hk, n, dv), r(b, hk, t, d), r(b, hk, t, dv), past_lengths


def sdpa(q, k_past, v_past, k_new, v_new, scale, past_lengths=None):
    """SDPA (math) on the concatenated cache, K/V repeated per query head, the boolean mask spelled out."""
    b, h, t, _ = q.shape
    hk, n = k_past.shape[1], k_past.shape[2]
    k = torch.cat([k_past, k_new], 2).repeat_interleave(h // hk, 1)
    v = torch.cat([v_past, v_new], 2).repeat_interleave(h // hk, 1)
    j = torch.arange(n + t)
    mask = ((j < n) | (j - n <= torch.arange(t)[:, None])).expand(b, h, t, n + t)
    if past_lengths is not None:
        held = (j < past_lengths.repeat_interleave(h // hk, 1)[..., None]) | (j >= n)
        mask = mask & held[:, :, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


REF_CASES = [  # b, h, hk, t, n, d, dv, ragged
    (2, 4, 4, 1, 9, 8, 8, False), (1, 4, 2, 3, 7, 8, 8, False), (2, 8, 2, 1, 11, 6, 10, True),
    (1, 4, 1, 3, 0, 8, 8, False), (2, 6, 3, 3, 5, 8, 8, True)]


@pytest.mark.parametrize("b, h, hk, t, n, d, dv, ragged", REF_CASES)
def test_reference_matches_sdpa_on_the_repeated_cache(b, h, hk, t, n, d, dv, ragged):
    args = make(b, h, hk, t, n, d, dv, seed=n, lengths=ragged)
    scale = da.default_scale(d)
    out = ops.decode_attention(*args[:5], scale, args[5])
    assert out.shape == (b, h, t, dv) and out.dtype == torch.float32
    torch.testing.assert_close(out, sdpa(*args[:5], scale, args[5]), rtol=1e-5, atol=1e-5)


def test_reference_never_reads_beyond_past_lengths():
    q, kp, vp, kn, vn, pl = make(2, 4, 2, 1, 10, 8, lengths=True)
    out = ops.decode_attention(q, kp, vp, kn, vn, 0.3, pl)
    kp2, vp2 = kp.clone(), vp.clone()
    for bi in range(2):
        for gi in range(2):
            kp2[bi, gi, pl[bi, gi]:] = float("nan")
            vp2[bi, gi, pl[bi, gi]:] = float("nan")
    torch.testing.assert_close(ops.decode_attention(q, kp2, vp2, kn, vn, 0.3, pl), out)


def test_reference_probs_sum_to_rows_per_group():
    q, kp, vp, kn, vn, pl = make(2, 8, 2, 3, 6, 8, lengths=True)
    out, probs = ops.decode_attention_scores(q, kp, vp, kn, vn, 0.3, pl)
    assert probs.shape == (2, 2, 9) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.full((2, 2), 4.0 * 3))  # group 4 heads x 3 tokens
    assert (probs[0, 0, :6] == 0).all()  # head (0, 0) holds no past entry
    # its first new entry is every row's only visible entry for token 0: 4 heads x 1, plus what tokens 1, 2 pay it
    assert probs[0, 0, 6] > 4.0


# ---------------------------------------------------------------------------------------------------------
# the Triton kernels (interpreter on the CPU) against the reference


@pytest.fixture(scope="module")
def dt():
    pytest.importorskip("triton")
    from prunus.kernels import decode_attention_triton

    return decode_attention_triton


KERNEL_CASES = [  # b, h, hk, t, n, d, dv, ragged, splits: GQA 1/2/4 groups, n = 0, t = 1 and 3, odd dims
    (1, 2, 2, 1, 20, 16, 16, False, 2),  # group 1
    (1, 4, 2, 3, 37, 8, 8, False, 3),  # group 2, t = 3, a partial last block
    (2, 8, 2, 1, 40, 16, 16, True, 2),  # group 4, ragged lengths (an empty head, a full head)
    (1, 4, 1, 3, 0, 8, 8, False, None),  # no past: only the new tokens, causal
    (1, 4, 2, 1, 19, 5, 7, True, None),  # odd head dims, padded with masks; automatic split plan
]


@needs_kernels
@pytest.mark.parametrize("raw_scores", [True, False], ids=["stored-scores", "keys-read-again"])
@pytest.mark.parametrize("b, h, hk, t, n, d, dv, ragged, splits", KERNEL_CASES)
def test_kernel_matches_reference(dt, monkeypatch, b, h, hk, t, n, d, dv, ragged, splits, raw_scores):
    args = make(b, h, hk, t, n, d, dv, seed=n + t, lengths=ragged)
    scale = da.default_scale(d)
    dev = [None if a is None else a.to(DEVICE) for a in args]
    unused = "_scores_kernel" if raw_scores else "_probs_kernel"
    monkeypatch.setattr(dt, unused, None)  # the probabilities come from the other path alone
    out, probs = dt.decode_attention_scores(*dev[:5], scale, dev[5], config=SMALL, num_splits=splits,
                                            raw_scores=raw_scores)
    ref, ref_probs = da.decode_attention_reference(*args[:5], scale, args[5], return_probs=True)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs.cpu(), ref_probs, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_kernel_never_reads_beyond_past_lengths_and_takes_strided_slices(dt):
    """A cache preallocated to 48 entries, passed as a [:, :, :24] slice whose tail beyond the lengths is NaN."""
    q, kp, vp, kn, vn, pl = make(2, 4, 2, 1, 24, 16, lengths=True, seed=3)
    kbuf, vbuf = torch.full((2, 2, 48, 16), float("nan")), torch.full((2, 2, 48, 16), float("nan"))
    for bi in range(2):
        for gi in range(2):
            kbuf[bi, gi, :pl[bi, gi]] = kp[bi, gi, :pl[bi, gi]]
            vbuf[bi, gi, :pl[bi, gi]] = vp[bi, gi, :pl[bi, gi]]
    out = dt.decode_attention(q, kbuf[:, :, :24], vbuf[:, :, :24], kn, vn, 0.25, pl, config=SMALL, num_splits=2)
    torch.testing.assert_close(out, da.decode_attention_reference(q, kp, vp, kn, vn, 0.25, pl), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_kernel_row_blocks_beyond_one_block(dt):
    """group 4 x t 20 = 80 query rows: two row blocks of 64."""
    args = make(1, 4, 1, 20, 16, 16, seed=7)
    out = dt.decode_attention(*args[:5], 0.25, None, config=SMALL, num_splits=1)
    torch.testing.assert_close(out, da.decode_attention_reference(*args[:5], 0.25), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# the ops on CUDA (bf16, llama shapes, the dispatch)


@needs_cuda
@pytest.mark.parametrize("t, n, ragged", [(1, 1000, False), (1, 5000, True), (3, 300, True), (1, 0, False)])
def test_cuda_ops_bf16(t, n, ragged):
    args = make(2, 32, 8, t, n, 128, dtype=torch.bfloat16, lengths=ragged, seed=n)
    dev = [None if a is None else a.cuda() for a in args]
    out, probs = ops.decode_attention_scores(*dev[:5], 128 ** -0.5, dev[5])
    ref, ref_probs = da.decode_attention_reference(*args[:5], 128 ** -0.5, args[5], return_probs=True)
    assert out.dtype == torch.bfloat16
    assert ((out.float().cpu() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    torch.testing.assert_close(probs.cpu(), ref_probs, rtol=2e-2, atol=2e-3)
    # the scores variant is tuned on its own (RAW is in the autotune key): a different split or block may
    # round differently, within one bf16 step of the output's largest entries
    torch.testing.assert_close(ops.decode_attention(*dev[:5], 128 ** -0.5, dev[5]), out, rtol=2e-2, atol=1e-3)
