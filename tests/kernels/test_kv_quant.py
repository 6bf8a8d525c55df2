"""KIVI-style quantized cache: packing, quantize -> dequantize error bounds, the reference against
decode_attention on the dequantized cache, the Triton kernel against the reference (CPU: TRITON_INTERPRET=1,
small shapes, fp32; CUDA: the real kernel, bf16), and the op under torch.export."""
import pytest
import torch

from prunus.kernels import decode_attention as da
from prunus.kernels import kv_quant as kq
from tests.conftest import CUDA, DEVICE, needs_kernels, needs_cuda, SMALL_ATTENTION as SMALL

ops = torch.ops.prunus


def cache(b, h, hk, t, n_q, r, d, dv, bits, group, seed=0, dtype=torch.float32):
    """q, the quantized parts of keys with channel offsets (KIVI's outlier channels) and values, residual, new."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    k = rnd(b, hk, n_q, d) + 4 * rnd(1, hk, 1, d)
    v = rnd(b, hk, n_q, dv)
    rest = [x.to(dtype) for x in (rnd(b, hk, r, d), rnd(b, hk, r, dv), rnd(b, hk, t, d), rnd(b, hk, t, dv))]
    K = kq.quantize_keys(k.to(dtype), bits, group)
    V = kq.quantize_values(v.to(dtype), bits, group)
    return rnd(b, h, t, d).to(dtype), K, V, rest, (k, v)


def test_pack_round_trip_and_nibble_order():
    q = torch.randint(0, 16, (2, 3, 5, 8), dtype=torch.uint8)
    assert torch.equal(kq.unpack(kq.pack(q, 4), 4), q)
    assert kq.pack(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), 4).tolist() == [[0x21, 0x43]]
    assert torch.equal(kq.pack(q, 8), q)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("meta_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_dequantize_within_half_a_step(bits, meta_dtype):
    """Every entry dequantizes within scale / 2 of its value, even with 16-bit scales and minimums."""
    g = torch.Generator().manual_seed(bits)
    k = torch.randn(2, 3, 64, 16, generator=g) * 2 + 10 * torch.randn(1, 3, 1, 16, generator=g)
    v = torch.randn(2, 3, 64, 32, generator=g)
    v[0, 0, 0] = 1.5  # a constant group
    k_q, k_s, k_m = kq.quantize_keys(k, bits, 16, meta_dtype)
    v_q, v_s, v_m = kq.quantize_values(v, bits, 16, meta_dtype)
    assert k_q.shape == (2, 3, 64, 16 * bits // 8) and k_s.shape == k_m.shape == (2, 3, 4, 16)
    assert v_q.shape == (2, 3, 64, 32 * bits // 8) and v_s.shape == v_m.shape == (2, 3, 64, 2)
    assert k_q.dtype == torch.uint8 and k_s.dtype == meta_dtype
    k_err = (kq.dequantize_keys(k_q, k_s, k_m, bits, 16) - k).abs()
    v_err = (kq.dequantize_values(v_q, v_s, v_m, bits, 16) - v).abs()
    k_half = k_s.float().repeat_interleave(16, 2) / 2
    v_half = v_s.float().repeat_interleave(16, 3) / 2
    tol = 1e-6 * (1 + k.abs())
    assert (k_err <= k_half * (1 + 1e-4) + tol).all()
    assert (v_err <= v_half * (1 + 1e-4) + 1e-6 * (1 + v.abs())).all()
    assert v_err[0, 0, 0].max() == 0  # constant group: exact
    # the step is the range over 2^bits - 1, up to the rounding of the 16-bit scale and minimum
    k_range = k.view(2, 3, 4, 16, 16).amax(3) - k.view(2, 3, 4, 16, 16).amin(3)
    slack = 1.02 if meta_dtype == torch.float32 else 1.1
    assert (k_s.float() <= k_range / ((1 << bits) - 1) * slack + 1e-3).all()


def test_value_groups_cover_a_narrow_head():
    v = torch.randn(1, 1, 4, 16)
    v_q, v_s, v_m = kq.quantize_values(v, 8, 64)  # group 64 > head 16: one group per token
    assert v_s.shape == (1, 1, 4, 1)
    assert (kq.dequantize_values(v_q, v_s, v_m, 8, 64) - v).abs().max() < 0.02


def test_layout_errors_are_value_errors():
    with pytest.raises(ValueError, match="whole number of groups"):
        kq.quantize_keys(torch.randn(1, 1, 20, 8), 4, 16)
    with pytest.raises(ValueError, match="even head dim"):
        kq.quantize_values(torch.randn(1, 1, 16, 7), 4, 16)


@pytest.mark.parametrize("bits", [8, 4])
def test_reference_is_decode_attention_on_the_dequantized_cache(bits):
    q, K, V, (kr, vr, kn, vn), (k, v) = cache(2, 8, 2, 3, 32, 5, 16, 16, bits, 16)
    out = ops.decode_attention_quantized(q, *K, *V, kr, vr, kn, vn, 0.25, bits, 16)
    k_deq = torch.cat([kq.dequantize_keys(*K, bits, 16), kr], 2)
    v_deq = torch.cat([kq.dequantize_values(*V, bits, 16), vr], 2)
    torch.testing.assert_close(out, da.decode_attention_reference(q, k_deq, v_deq, kn, vn, 0.25), rtol=1e-5,
                               atol=1e-5)
    # and close to attention over the unquantized cache: 8 bits tightly, 4 bits loosely
    exact = da.decode_attention_reference(q, torch.cat([k, kr], 2), torch.cat([v, vr], 2), kn, vn, 0.25)
    err = ((out - exact).norm() / exact.norm()).item()
    assert err < (0.01 if bits == 8 else 0.15)


# ---------------------------------------------------------------------------------------------------------
# the Triton kernel (interpreter on the CPU) against the reference


@pytest.fixture(scope="module")
def kt():
    pytest.importorskip("triton")
    from prunus.kernels import kv_quant_triton

    return kv_quant_triton


KERNEL_CASES = [  # b, h, hk, t, n_q, r, d, dv, bits, group, splits
    (1, 4, 2, 1, 32, 5, 16, 16, 8, 16, 2),  # one value group per token (folded scales), two splits
    (1, 4, 2, 1, 32, 5, 16, 16, 4, 16, 1),
    (1, 8, 2, 3, 32, 0, 32, 32, 4, 16, 2),  # group 4, t = 3, two value groups per token (dequantized), no residual
    (1, 2, 2, 1, 16, 3, 32, 32, 8, 16, None),  # group 1, two value groups
    (1, 4, 1, 1, 0, 7, 16, 16, 4, 16, None),  # nothing quantized yet: the residual and the new token
]


@needs_kernels
@pytest.mark.parametrize("b, h, hk, t, n_q, r, d, dv, bits, group, splits", KERNEL_CASES)
def test_kernel_matches_reference(kt, b, h, hk, t, n_q, r, d, dv, bits, group, splits):
    q, K, V, rest, _ = cache(b, h, hk, t, n_q, r, d, dv, bits, group, seed=n_q + r)
    args = [x.to(DEVICE) for x in (q, *K, *V, *rest)]
    out = kt.decode_attention_quantized(*args, 0.25, bits, group, config=SMALL, num_splits=splits)
    ref = kq.decode_attention_quantized_reference(q, *K, *V, *rest, 0.25, bits, group)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("raw_scores", [True, False], ids=["stored-scores", "keys-read-again"])
@pytest.mark.parametrize("b, h, hk, t, n_q, r, d, dv, bits, group, splits", KERNEL_CASES)
def test_scores_kernel_matches_reference(kt, monkeypatch, b, h, hk, t, n_q, r, d, dv, bits, group, splits,
                                         raw_scores):
    from prunus.kernels import decode_attention_triton as dat

    q, K, V, rest, _ = cache(b, h, hk, t, n_q, r, d, dv, bits, group, seed=n_q + r + 1)
    args = [x.to(DEVICE) for x in (q, *K, *V, *rest)]
    if raw_scores:  # the probabilities come from the stored scores alone
        monkeypatch.setattr(kt, "_quant_scores_kernel", None)
    else:
        monkeypatch.setattr(dat, "_probs_kernel", None)
    out, probs = kt.decode_attention_quantized_scores(*args, 0.25, bits, group, config=SMALL, num_splits=splits,
                                                      raw_scores=raw_scores)
    ref_out, ref_probs = kq.decode_attention_quantized_scores_reference(q, *K, *V, *rest, 0.25, bits, group)
    assert probs.shape == (b, hk, n_q + r + t)
    torch.testing.assert_close(out.cpu(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs.cpu(), ref_probs, rtol=1e-5, atol=1e-5)
    # each row's probabilities sum to one: the group's rows together to group * t
    torch.testing.assert_close(probs.sum(-1).cpu(), torch.full((b, hk), float(h // hk * t)), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_kernel_reads_slices_of_a_preallocated_cache(kt):
    """The quantized part as views [:, :, :len] of buffers twice as long whose unused tail is garbage."""
    q, K, V, rest, _ = cache(1, 4, 2, 1, 32, 3, 16, 16, 4, 16, seed=9)
    bufs = []
    for x in (*K, *V):
        big = torch.full((*x.shape[:2], 2 * x.shape[2], x.shape[3]), 77, dtype=x.dtype)
        big[:, :, :x.shape[2]] = x
        bufs.append(big[:, :, :x.shape[2]])
    out = kt.decode_attention_quantized(q, *bufs, *rest, 0.25, 4, 16, config=SMALL, num_splits=2)
    torch.testing.assert_close(out, kq.decode_attention_quantized_reference(q, *K, *V, *rest, 0.25, 4, 16),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# CUDA (bf16, llama shapes) and export


@needs_cuda
@pytest.mark.parametrize("bits, group", [(8, 32), (4, 32), (4, 128)])
def test_cuda_op_bf16(bits, group):
    q, K, V, rest, _ = cache(2, 32, 8, 1, 8 * group, group - 1, 128, 128, bits, group, dtype=torch.bfloat16)
    args = [x.cuda() for x in (q, *K, *V, *rest)]
    out = ops.decode_attention_quantized(*args, 128 ** -0.5, bits, group)
    ref_args = (q.float(), *K, *V, *[x.float() for x in rest], 128 ** -0.5, bits, group)
    ref = kq.decode_attention_quantized_reference(*ref_args)
    assert out.dtype == torch.bfloat16
    assert ((out.float().cpu() - ref).norm() / ref.norm()).item() < 1e-2
    out2, probs = ops.decode_attention_quantized_scores(*args, 128 ** -0.5, bits, group)
    _, ref_probs = kq.decode_attention_quantized_scores_reference(*ref_args)
    assert torch.equal(out2, out) and ((probs.cpu() - ref_probs).norm() / ref_probs.norm()).item() < 1e-2


class _Quantized(torch.nn.Module):
    def forward(self, q, k_q, k_s, k_m, v_q, v_s, v_m, kr, vr, kn, vn):
        return ops.decode_attention_quantized(q, k_q, k_s, k_m, v_q, v_s, v_m, kr, vr, kn, vn, 0.25, 4, 16) * 2


def test_export_keeps_the_op():
    q, K, V, rest, _ = cache(1, 4, 2, 1, 32, 3, 16, 16, 4, 16)
    ep = torch.export.export(_Quantized(), (q, *K, *V, *rest), strict=False)
    assert ops.decode_attention_quantized.default in [n.target for n in ep.graph.nodes]
    torch.testing.assert_close(ep.module()(q, *K, *V, *rest), _Quantized()(q, *K, *V, *rest))
