"""Quantized linear ops: packed format, references against the formulas, Triton kernels against the
references (CPU: under TRITON_INTERPRET=1, small shapes, fp32; CUDA: the real kernels), fake impls under
torch.export."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import prunus.kernels as pk
from prunus.kernels import quant_linear as ql
from tests.conftest import CUDA, DEVICE, needs_kernels, needs_cuda

ops = torch.ops.prunus


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def int4_weight(n, k, group, seed=0, float_zeros=False, dtype=torch.float32):
    g = _gen(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, k // group, generator=g) * 0.1 + 0.01).to(dtype)
    zeros = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, generator=g)
    if float_zeros:
        zeros = (zeros.float() + torch.rand(zeros.shape, generator=g)).to(dtype)
    return q, pk.pack_int4(q), scales, zeros


def int8_weight(n, k, seed=0, dtype=torch.float32):
    g = _gen(seed)
    return (torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g),
            (torch.rand(n, generator=g) * 0.01 + 0.001).to(dtype))


def explicit_int4(q, scales, zeros, group):
    """W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G], element by element as the contract states."""
    k = torch.arange(q.shape[1])
    return (q.float() - zeros.float()[:, k // group]) * scales.float()[:, k // group]


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


# ---------------------------------------------------------------------------------------------------------
# packing


def test_pack_unpack_round_trip_and_nibble_order():
    q = torch.randint(0, 16, (5, 12), dtype=torch.uint8, generator=_gen(1))
    packed = pk.pack_int4(q)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert torch.equal(pk.unpack_int4(packed), q)
    # byte j: k = 2j in the low nibble, k = 2j + 1 in the high nibble (ONNX Runtime MatMulNBits order)
    assert pk.pack_int4(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)).tolist() == [[0x21, 0x43]]


def test_dequantize_helpers_match_formulas():
    q, qw, s, z = int4_weight(7, 64, 16, seed=2)
    assert torch.equal(pk.dequantize_int4(qw, s, z, 16), explicit_int4(q, s, z, 16))
    q8, s8 = int8_weight(7, 64)
    assert torch.equal(pk.dequantize_int8(q8, s8), q8.float() * s8[:, None])


# ---------------------------------------------------------------------------------------------------------
# references (the ops on the CPU) against explicit dequantize-then-matmul


@pytest.mark.parametrize("n, k, group, bias, float_zeros", [(33, 64, 32, True, False), (16, 96, 32, False, False),
                                                            (5, 128, 128, True, True), (48, 64, 8, False, True)])
def test_linear_int4_reference(n, k, group, bias, float_zeros):
    q, qw, s, z = int4_weight(n, k, group, seed=n, float_zeros=float_zeros)
    x = torch.randn(2, 3, k, generator=_gen(3))
    b = torch.randn(n, generator=_gen(4)) if bias else None
    y = ops.linear_int4(x, qw, s, z, b, group)
    ref = x @ explicit_int4(q, s, z, group).T + (b if bias else 0)
    assert y.shape == (2, 3, n) and y.dtype == x.dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, bias", [(33, True), (16, False)])
def test_linear_int8_reference(n, bias):
    q, s = int8_weight(n, 80, seed=n)
    x = torch.randn(4, 80, generator=_gen(5))
    b = torch.randn(n, generator=_gen(6)) if bias else None
    torch.testing.assert_close(ops.linear_int8(x, q, s, b), x @ (q.float() * s[:, None]).T + (b if bias else 0))


@pytest.mark.parametrize("n, smooth, bias", [(33, True, True), (16, False, False)])
def test_linear_w8a8_reference(n, smooth, bias):
    k = 96
    q, s = int8_weight(n, k, seed=n)
    x = torch.randn(2, 3, k, generator=_gen(7))
    x[0, 1] = 0  # an all-zero row: scale guarded, output = bias
    sm = torch.rand(k, generator=_gen(8)) + 0.5 if smooth else None
    b = torch.randn(n, generator=_gen(9)) if bias else None
    y = ops.linear_w8a8(x, q, s, sm, b)
    xs = (x / sm if smooth else x).reshape(-1, k).double()
    a_scale = xs.abs().amax(-1, keepdim=True) / 127
    a_scale[a_scale == 0] = 1
    xq = torch.round(xs / a_scale).clamp(-127, 127)
    ref = (xq @ q.double().T) * a_scale * s.double() + (b.double() if bias else 0)
    assert y.shape == (2, 3, n)
    torch.testing.assert_close(y.reshape(-1, n).double(), ref, rtol=1e-5, atol=1e-5)


def test_linear_fp8_reference():
    g = _gen(10)
    q = (torch.randn(24, 32, generator=g) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(24, generator=g) * 0.01
    x, b = torch.randn(3, 32, generator=g), torch.randn(24, generator=g)
    torch.testing.assert_close(ops.linear_fp8(x, q, s, b), x @ (q.float() * s[:, None]).T + b)


def test_bf16_activations_stay_bf16():
    _, qw, s, z = int4_weight(16, 64, 32, dtype=torch.bfloat16)
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert ops.linear_int4(x, qw, s, z, None, 32).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on the CPU, compiled on CUDA) against the references


@pytest.fixture(scope="module")
def qt():
    pytest.importorskip("triton")
    from prunus.kernels import quant_linear_triton

    return quant_linear_triton


GEMV_CONFIGS = [None, dict(BLOCK_N=16, GROUPS=1, SPLIT_K=1), dict(BLOCK_N=32, GROUPS=2, SPLIT_K=2),
                dict(BLOCK_N=16, GROUPS=4, SPLIT_K=1), dict(BLOCK_N=16, GROUPS=2, SPLIT_K=1, PREFETCH=1),
                dict(BLOCK_N=8, GROUPS=1, SPLIT_K=4, PREFETCH=1),
                dict(BLOCK_N=16, GROUPS=4, SPLIT_K=2, MASKREG=1), dict(BLOCK_N=16, GROUPS=4, SPLIT_K=2, PAIRS=1),
                dict(BLOCK_N=8, GROUPS=2, SPLIT_K=1, PREFETCH=1, PAIRS=1),
                dict(BLOCK_N=16, GROUPS=4, SPLIT_K=2, ASM=1), dict(BLOCK_N=8, GROUPS=1, SPLIT_K=1, PREFETCH=1, ASM=1),
                dict(BLOCK_N=16, GROUPS=1, SPLIT_K=2, STAGES=3, ASM=1)]
GEMM_CONFIGS = [None, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=1),
                dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, SPLIT_K=2),
                dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, DEQUANT=1),
                dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, SPLIT_K=2, DEQUANT=1),
                dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, SPLIT_K=2, PREFETCH=0),
                dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, SPLIT_K=2, DEQUANT=1, W_AS_B=1)]


def _gemv_tol(config) -> float:
    """PAIRS and ASM codes enter as 2048 + q for half the fields: with fp32 x the products round (exact for bf16 x).
    On a GPU the autotuner (config None) may pick them."""
    if (config is None and CUDA) or (config and (config.get("PAIRS") or config.get("ASM"))):
        return 1e-3
    return 1e-4


@needs_kernels
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("config", GEMV_CONFIGS, ids=["autotune", "one-group-steps", "two-group-steps-split-k",
                                                        "four-group-steps-past-k", "prefetch",
                                                        "prefetch-split-k-empty-split", "mask-argument",
                                                        "paired-fields", "paired-fields-prefetch", "ptx-words",
                                                        "ptx-words-prefetch", "ptx-words-async-copies"])
def test_int4_gemv_kernel(qt, m, config):
    q, qw, s, z = int4_weight(48, 96, 32, seed=m, float_zeros=m == 3)  # 3 groups: a half-empty last step
    x, b = torch.randn(m, 96, generator=_gen(11)), torch.randn(48, generator=_gen(12))
    y = qt.int4_gemv(*to(DEVICE, x, qw, s, z, b), 32, config)
    tol = _gemv_tol(config)
    torch.testing.assert_close(y.cpu(), ops.linear_int4(x, qw, s, z, b, 32), rtol=tol, atol=tol)


@needs_kernels
@pytest.mark.parametrize("group, k", [(8, 72), (256, 512)], ids=["one-word-groups", "wide-groups"])
def test_int4_gemv_kernel_group_sizes(qt, group, k):
    q, qw, s, z = int4_weight(24, k, group, seed=group)
    x = torch.randn(1, k, generator=_gen(15))
    y = qt.int4_gemv(*to(DEVICE, x, qw, s, z), None, group)
    torch.testing.assert_close(y.cpu(), ops.linear_int4(x, qw, s, z, None, group), rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("m, kernel", [(1, "int4_gemv"), (5, "int4_gemm")])
def test_linear_int4_kernels_take_a_partial_last_group(qt, monkeypatch, m, kernel):
    """K not a multiple of the group (SmolLM2's 576 in groups of 128): the storage pads K to whole groups, and the
    op's CUDA implementation runs its kernels on x padded with zeros, not the reference (which rebuilds the whole
    weight on every call). The padding's codes are nonzero here: only x's zeros may cancel them."""
    q, qw, s, z = int4_weight(24, 128, 64, seed=m)  # stored K: 2 groups of 64
    q[:, 96:] = 15
    qw = pk.pack_int4(q)
    x, b = torch.randn(m, 96, generator=_gen(50)), torch.randn(24, generator=_gen(51))  # K = 96: 1.5 groups
    calls, launch = [], getattr(qt, kernel)
    monkeypatch.setattr(qt, kernel, lambda x2, *args: calls.append(tuple(x2.shape)) or launch(x2, *args))
    y = ql._linear_int4_cuda(*to(DEVICE, x, qw, s, z, b), 64)
    assert calls == [(m, 128)] and y.shape == (m, 24)
    torch.testing.assert_close(y.cpu(), x @ explicit_int4(q, s, z, 64)[:, :96].T + b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.cpu(), ops.linear_int4(x, qw, s, z, b, 64), rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("config", GEMM_CONFIGS, ids=["autotune", "one-group-blocks", "half-group-split-k",
                                                    "dequantized-tile", "dequantized-half-group-split-k",
                                                    "group-params-in-loop", "weight-as-second-operand"])
def test_int4_gemm_kernel(qt, m, config):
    q, qw, s, z = int4_weight(40, 64, 32, seed=m, float_zeros=m == 3)
    x, b = torch.randn(m, 64, generator=_gen(13)), torch.randn(40, generator=_gen(14))
    y = qt.int4_gemm(*to(DEVICE, x, qw, s, z, b), 32, config)
    torch.testing.assert_close(y.cpu(), ops.linear_int4(x, qw, s, z, b, 32), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_int4_gemm_kernel_fp16_magic_operand(qt):
    """fp16 activations take the 1024 + q tensor-core operand; error stays at fp16 rounding of x and y."""
    q, qw, s, z = int4_weight(32, 64, 32, seed=5, dtype=torch.float16)
    x = torch.randn(5, 64, generator=_gen(15)).half()
    y = qt.int4_gemm(*to(DEVICE, x, qw, s, z), None, 32, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=1))
    assert rel_err(y.cpu(), x.float() @ explicit_int4(q, s, z, 32).T) < 2e-3


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32])  # bf16: the interpreter's bf16 is wrong; CUDA test below
@pytest.mark.parametrize("m, config", [(3, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=1, DEQUANT=2)),
                                       (17, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, SPLIT_K=2, DEQUANT=2)),
                                       (3, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=1, DEQUANT=3)),
                                       (17, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, SPLIT_K=2, DEQUANT=3)),
                                       (17, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, DEQUANT=3, W_AS_B=1))],
                         ids=["codes-minus-zero", "codes-minus-zero-half-groups-split-k", "packed-dequantized",
                              "packed-dequantized-half-groups-split-k", "packed-dequantized-weight-as-second"])
def test_int4_gemm_codes_minus_zero(qt, m, config, dtype):
    q, qw, s, z = int4_weight(40, 64, 32, seed=m, dtype=dtype)
    x, b = torch.randn(m, 64, generator=_gen(16)).to(dtype), torch.randn(40, generator=_gen(17)).to(dtype)
    y = qt.int4_gemm(*to(DEVICE, x, qw, s, z, b), 32, config)
    ref = ops.linear_int4(x.float(), qw, s.float(), z, b.float(), 32)
    torch.testing.assert_close(y.cpu().float(), ref, rtol=1e-4, atol=1e-4)
    if config["DEQUANT"] == 3:
        with pytest.raises(ValueError, match="activations' dtype"):
            qt.int4_gemm(*to(DEVICE, x, qw, s.half(), z, b), 32, config)
    with pytest.raises(ValueError, match="integer zero points"):
        _, qw, s, zf = int4_weight(40, 64, 32, seed=m, float_zeros=True, dtype=dtype)
        qt.int4_gemm(*to(DEVICE, x, qw, s, zf, b), 32, config)
    if config["DEQUANT"] == 2:
        with pytest.raises(ValueError, match="W_AS_B needs DEQUANT=1 or 3"):
            qt.int4_gemm(*to(DEVICE, x, qw, s, z, b), 32, dict(config, W_AS_B=1))


@needs_kernels
@pytest.mark.parametrize("n, k, group", [(33, 96, 32), (9, 2048, 8)], ids=["one-program-per-row-block", "two-along-k"])
def test_int4_dequantize_kernel_is_exact(qt, n, k, group):
    _, qw, s, z = int4_weight(n, k, group, seed=6)
    assert torch.equal(qt.int4_dequantize(*to(DEVICE, qw, s, z), group).cpu(), pk.dequantize_int4(qw, s, z, group))


@needs_kernels
@pytest.mark.parametrize("m, config", [(1, None), (3, dict(BLOCK_N=16, CHUNK=64, UNROLL=2, SPLIT_K=2))])
def test_int8_gemv_kernel(qt, m, config):
    q, s = int8_weight(40, 96, seed=m)
    x, b = torch.randn(m, 96, generator=_gen(16)), torch.randn(40, generator=_gen(17))
    y = qt.int8_gemv(*to(DEVICE, x, q, s, b), config)
    torch.testing.assert_close(y.cpu(), ops.linear_int8(x, q, s, b), rtol=1e-4, atol=1e-4)


INT8_GEMM_TEST_CONFIGS = [(3, None), (17, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)),
                          (17, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=2)),  # 2 + 1 blocks of K
                          (5, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=4))]  # one block each, one empty
INT8_GEMM_TEST_IDS = ["autotune", "one-pass", "split-k", "split-k-empty-split"]


@needs_kernels
@pytest.mark.parametrize("m, config", INT8_GEMM_TEST_CONFIGS, ids=INT8_GEMM_TEST_IDS)
def test_int8_weight_only_gemm_kernel(qt, m, config):
    q, s = int8_weight(40, 96, seed=m)  # K = 96: the second 64-wide block is half past K
    x, b = torch.randn(m, 96, generator=_gen(30)), torch.randn(40, generator=_gen(31))
    y = qt.int8_gemm_weight_only(*to(DEVICE, x, q, s, b), config)
    torch.testing.assert_close(y.cpu(), ops.linear_int8(x, q, s, b), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_quantize_rows_kernel_matches_reference_exactly(qt):
    x = torch.randn(6, 100, generator=_gen(18)) * 3
    x[2] = 0
    x[4, :10] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0, 0, 0, 0, 127.0])  # ties: half to even
    smooth = torch.rand(100, generator=_gen(19)) + 0.5
    for sm in (None, smooth):
        xq, a_scale = qt.quantize_rows(*to(DEVICE, x, sm), torch.int8)
        ref_q, ref_scale = ql.quantize_activations_int8(x, sm)
        assert torch.equal(xq.cpu(), ref_q) and torch.equal(a_scale.cpu(), ref_scale)


@needs_kernels
@pytest.mark.parametrize("m, config", INT8_GEMM_TEST_CONFIGS, ids=INT8_GEMM_TEST_IDS)
def test_int8_gemm_kernel(qt, m, config):
    q, s = int8_weight(40, 96, seed=m)
    x, b = torch.randn(m, 96, generator=_gen(20)), torch.randn(40, generator=_gen(21))
    xq, a_scale = ql.quantize_activations_int8(x)
    y = qt.int8_gemm(*to(DEVICE, xq, a_scale, q, s, b), torch.float32, config)
    torch.testing.assert_close(y.cpu(), ops.linear_w8a8(x, q, s, None, b), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# the ops' CUDA implementations, every dispatch path, bf16


@needs_cuda
@pytest.mark.parametrize("m", [1, 2, 16, 64, 100, 300])
@pytest.mark.parametrize("group", [32, 128])
def test_cuda_linear_int4_dispatch(m, group):
    n, k = 1000, 1024
    q, qw, s, z = int4_weight(n, k, group, seed=m, dtype=torch.bfloat16)
    x, b = torch.randn(m, k, generator=_gen(22)).bfloat16(), torch.randn(n, generator=_gen(23)).bfloat16()
    y = ops.linear_int4(*to("cuda", x, qw, s, z, b), group)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.cpu(), x.float() @ explicit_int4(q, s, z, group).T + b.float()) < 1e-2


def _tuned_configs():
    from prunus.kernels import quant_linear_triton as qt

    return ([("gemv", c) for c in qt.INT4_GEMV_CONFIGS] + [("gemm", c) for c in qt.INT4_GEMM_CONFIGS]
            if CUDA else [])


def _int8_tuned_configs():
    from prunus.kernels import quant_linear_triton as qt

    return ([("weight-only", c) for c in qt.INT8_WEIGHT_GEMM_CONFIGS] + [("w8a8", c) for c in qt.INT8_GEMM_CONFIGS]
            if CUDA else [])


@needs_cuda
@pytest.mark.parametrize("kind, config", _int8_tuned_configs(), ids=lambda v: v if isinstance(v, str) else
                         str(v.kwargs))
def test_cuda_every_autotuned_int8_gemm_config_is_correct(qt, kind, config):
    """bf16 weight-only and W8A8 on the tensor-core int8 kernel, each autotuned config (split-K included)."""
    q, s = int8_weight(300, 1024, seed=12, dtype=torch.bfloat16)
    x = torch.randn(max(16, config.kwargs["BLOCK_M"]) + 3, 1024, generator=_gen(34)).bfloat16()
    cfg = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    ref = x.float() @ (q.float() * s.float()[:, None]).T
    if kind == "weight-only":
        y = qt.int8_gemm_weight_only(*to("cuda", x, q, s), None, cfg)
    else:
        xq, a_scale = qt.quantize_rows(x.cuda(), None, torch.int8)
        y = qt.int8_gemm(xq, a_scale, *to("cuda", q, s), None, torch.bfloat16, cfg)
    assert rel_err(y.cpu(), ref) < 2e-2


@needs_cuda
@pytest.mark.parametrize("kind, config", _tuned_configs(), ids=lambda v: v if isinstance(v, str) else str(v.kwargs))
def test_cuda_every_autotuned_int4_config_is_correct(qt, kind, config):
    """The autotuner picks by time alone: every candidate must be right (bf16, on the GPU)."""
    q, qw, s, z = int4_weight(300, 1024, 128, seed=5, dtype=torch.bfloat16)
    m = 1 if kind == "gemv" else max(16, config.kwargs["BLOCK_M"])
    x = torch.randn(m, 1024, generator=_gen(26)).bfloat16()
    launch = qt.int4_gemv if kind == "gemv" else qt.int4_gemm
    cfg = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    y = launch(*to("cuda", x, qw, s, z), None, 128, cfg)
    assert rel_err(y.cpu(), x.float() @ explicit_int4(q, s, z, 128).T) < 1e-2


GLUON_KERNELS = ("int4_wgmma", "int4_gemv_mma", "int8_wgmma")


def _config_id(v) -> str:
    """A test id for a (kernel name, config dict) parameter: the name, or the config as KEY=V,..."""
    return v if isinstance(v, str) else ",".join(f"{k}={v}" for k, v in v.items())


def _measured_configs(gluon=None):
    """The measured table's (kernel, config) entries: the Triton kernels', or those of the Gluon kernel `gluon`."""
    from prunus.kernels.quant_linear_triton import MEASURED_CONFIGS_PATH

    table = json.loads(MEASURED_CONFIGS_PATH.read_text())
    return [(kernel, cfg) for kernels in table.values() for kernel, entries in kernels.items()
            for cfg in entries.values() if kernel == gluon or (gluon is None and kernel not in GLUON_KERNELS)]


@needs_kernels
@pytest.mark.parametrize("kernel, config", _measured_configs(), ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={v}" for k, v in v.items() if k.isupper()))
def test_every_measured_int4_config_is_correct(qt, kernel, config):
    """The measured-config table's entries run as given (no autotuner, no fitting): each must be right. On the GPU
    in bf16, the dtype they were measured in (an fp32 tile of the same size can overflow shared memory); on the
    interpreter in fp32 (its bf16 is wrong)."""
    dtype = torch.bfloat16 if CUDA else torch.float32
    m = 1 if kernel == "int4_gemv" else 17
    n = config["BLOCK_N"] + 8  # a partial last block of outputs
    q, qw, s, z = int4_weight(n, 256, 128, seed=7, dtype=dtype)  # two groups: SPLIT_K=4 leaves empty splits
    x = torch.randn(m, 256, generator=_gen(27)).to(dtype)
    launch = qt.int4_gemv if kernel == "int4_gemv" else qt.int4_gemm
    y = launch(*to(DEVICE, x, qw, s, z), None, 128, config)
    if CUDA:
        assert rel_err(y.cpu(), x.float() @ explicit_int4(q, s, z, 128).T) < 1e-2
    else:
        tol = _gemv_tol(config)
        torch.testing.assert_close(y.cpu(), ops.linear_int4(x, qw, s, z, None, 128), rtol=tol, atol=tol)


@needs_kernels
def test_measured_config_lookup(qt, monkeypatch):
    table = {"GPU A": {"int4_gemv": {"4096x14336/g128/m1": {"BLOCK_N": 128}},
                       "int4_gemm": {"4096x14336/g128/m64": {"BLOCK_M": 64}}}}
    monkeypatch.setattr(qt, "measured_configs", lambda: table)
    assert qt.shape_key(40, 14336, 4096, 128) == "4096x14336/g128/m64"  # rows by power-of-two bucket
    assert qt.measured_config("int4_gemv", "GPU A", 1, 14336, 4096, 128) == {"BLOCK_N": 128}
    assert qt.measured_config("int4_gemm", "GPU A", 33, 14336, 4096, 128) == {"BLOCK_M": 64}
    assert qt.measured_config("int4_gemm", "GPU A", 65, 14336, 4096, 128) is None  # another bucket: autotune
    assert qt.measured_config("int4_gemm", "GPU A", 64, 14336, 4096, 64) is None  # another group size
    assert qt.measured_config("int4_gemv", "GPU B", 1, 14336, 4096, 128) is None  # another GPU


def test_measured_config_table_off_and_from_sweep_log(qt, monkeypatch, tmp_path):
    from benchmarks.quant_linear_gpu import merge_winners, table_from_log

    qt.measured_configs.cache_clear()
    monkeypatch.setenv("PRUNUS_MEASURED_CONFIGS", "0")
    assert qt.measured_configs() == {}
    qt.measured_configs.cache_clear()
    monkeypatch.delenv("PRUNUS_MEASURED_CONFIGS")
    assert "NVIDIA H100 80GB HBM3" in qt.measured_configs()
    log = tmp_path / "sweep.log"
    log.write_text("4096->4096 M=1 9.50 {'BLOCK_N': 8, 'GROUPS': 4} 0.0023\n"
                   "4096->4096 M=1 8.25 {'BLOCK_N': 16, 'GROUPS': 2} 0.0023\n"
                   "4096->4096 M=1 inf {'BLOCK_N': 32, 'GROUPS': 2} OutOfResources\n"
                   "4096->4096 M=64 15.80 {'BLOCK_M': 64, 'DEQUANT': 2} 0.0023\n"
                   "4096->4096 M=64 9.00 {'BLOCK_M': 64, 'MMA_LAYOUT': 1} 0.0017\n"  # an older sweep's: not kept
                   # the Gluon kernels': not kept either (their entries need the Triton path's time: --sweep-table)
                   "4096->4096 M=64 7.00 {'BLOCK_M': 64, 'BLOCK_N': 64, 'STAGES': 5, 'SPLIT_K': 1} 0.0017\n"
                   "4096->4096 M=1 5.00 {'REPS': 2, 'SPLIT_K': 4, 'num_warps': 4, 'ONES': 1} 0.0023\n")  # (GEMV: same)
    path = tmp_path / "table.json"
    merge_winners(str(path), "GPU A", {("int4_gemv", "4096x4096/g128/m1"): {"BLOCK_N": 64}})
    merge_winners(str(path), "GPU B", table_from_log(str(log)))
    assert json.loads(path.read_text()) == {
        "GPU A": {"int4_gemv": {"4096x4096/g128/m1": {"BLOCK_N": 64}}},
        "GPU B": {"int4_gemv": {"4096x4096/g128/m1": {"BLOCK_N": 16, "GROUPS": 2}},
                  "int4_gemm": {"4096x4096/g128/m64": {"BLOCK_M": 64, "DEQUANT": 2}}}}


def test_sweep_workers_leave_out_a_config_that_kills_or_hangs_them(tmp_path):
    """benchmarks/_isolate.py: a bucket's worker that dies (a lost CUDA context) or hangs is run again without the
    config it tried last, until it finishes; a worker that fails before any config stops the sweep. Real worker
    processes: a script standing in for a benchmark, whose candidates 1 and 3 crash and hang."""
    from benchmarks._isolate import run_isolated
    from benchmarks.quant_linear_gpu import _without

    worker = tmp_path / "worker.py"
    worker.write_text(
        "import json, sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parents[2])!r})\n"
        "from benchmarks._isolate import announce\n"
        "skip = json.loads(sys.argv[1])\n"
        "for c in range(5):\n"
        "    if {'C': c} in skip:\n"
        "        continue\n"
        "    announce({'C': c})\n"
        "    if c == 1:\n"
        "        sys.exit(1)\n"
        "    if c == 3:\n"
        "        time.sleep(60)\n"
        "print('result', len(skip))\n")
    out, left_out = run_isolated(lambda skip: [str(worker), json.dumps(skip)], "bucket", timeout=8)
    assert out.splitlines()[-1] == "result 2"
    assert left_out == ["C=1: launch failure", "C=3: hang"]
    worker.write_text("import sys\nsys.exit(1)\n")
    with pytest.raises(SystemExit, match="before any config"):
        run_isolated(lambda skip: [str(worker)], "bucket", timeout=8)
    assert _without(["--sweep", "64", "--sweep-wgmma-rs", "--sweep-shapes=4096x4096", "--sweep-log", "l"],
                    "--sweep", "--sweep-shapes") == ["--sweep-wgmma-rs", "--sweep-log", "l"]


def test_sweep_runs_each_shape_and_row_count_in_a_worker(monkeypatch, capsys):
    """`quant_linear_gpu.py --sweep`: one worker a shape and row count, each given its bucket, the other options
    and the configs to leave out; the workers' results printed, and what each left out."""
    import benchmarks.quant_linear_gpu as qb

    runs = []

    def fake_run_isolated(argv, label, timeout):
        runs.append(argv([{"BLOCK_T": 64}]))
        return f"try {{}}\n{label} best", ["BLOCK_T=64: hang"] if len(runs) == 1 else []

    monkeypatch.setattr(qb, "run_isolated", fake_run_isolated)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("sys.argv", ["quant_linear_gpu.py", "--sweep", "64,256", "--sweep-wgmma-rs",
                                     "--sweep-shapes", "4096x4096,14336x4096", "--sweep-table", "t.json"])
    qb.main()
    assert [r[1:] for r in runs] == [
        ["--sweep-wgmma-rs", "--sweep-table", "t.json", "--sweep", m, "--sweep-shapes", shape, "--sweep-skip",
         '[{"BLOCK_T": 64}]'] for shape in ("4096x4096", "14336x4096") for m in ("64", "256")]
    out = capsys.readouterr().out
    assert "4096->4096 M=64 best" in out and "try" not in out and out.count("left out") == 1


def test_sweep_subset_competes_with_the_table_entry_it_would_replace(tmp_path):
    """`--sweep-only` with `--sweep-table` also times the table's entry for each shape and row bucket: the one
    `current_entry` finds for the sweep's kernel family (both wgmma kinds share "int4_wgmma")."""
    from benchmarks.quant_linear_gpu import current_entry, merge_winners

    path = tmp_path / "table.json"
    assert current_entry(str(path), "GPU A", "wgmma_rs", 4096, 4096, 256) is None  # no table yet
    merge_winners(str(path), "GPU A", {("int4_wgmma", "4096x4096/g128/m256"): {"BLOCK_T": 128, "STAGES": 4},
                                       ("int4_gemv", "4096x4096/g128/m1"): {"BLOCK_N": 8}})
    assert current_entry(str(path), "GPU A", "wgmma_rs", 4096, 4096, 200) == {"BLOCK_T": 128, "STAGES": 4}
    assert current_entry(str(path), "GPU A", "wgmma", 4096, 4096, 256) == {"BLOCK_T": 128, "STAGES": 4}
    assert current_entry(str(path), "GPU A", "gemv", 4096, 4096, 1) == {"BLOCK_N": 8}
    assert current_entry(str(path), "GPU A", "wgmma_rs", 4096, 4096, 128) is None  # another bucket
    assert current_entry(str(path), "GPU A", "gemv_mma", 4096, 4096, 1) is None  # another kernel
    assert current_entry(str(path), "GPU B", "wgmma_rs", 4096, 4096, 256) is None  # another GPU
    # a re-swept bucket (`drop`) keeps an entry only if it has a winner again (int8_wgmma_gpu.py --sweep-table)
    merge_winners(str(path), "GPU A", {("int4_gemv", "4096x4096/g128/m1"): {"BLOCK_N": 16}},
                  drop=[("int4_wgmma", "4096x4096/g128/m256"), ("int4_gemv", "4096x4096/g128/m1")])
    assert current_entry(str(path), "GPU A", "wgmma_rs", 4096, 4096, 256) is None
    assert current_entry(str(path), "GPU A", "gemv", 4096, 4096, 1) == {"BLOCK_N": 16}


def test_profile_script_names_the_kernel_each_config_launches(qt, qg):
    """benchmarks/quant_linear_profile.py filters Nsight Compute by kernel name: a renamed kernel or a variant
    launched under another name would leave the profile empty."""
    from benchmarks.quant_linear_profile import kernel_name

    cases = [("gemv", {}, qt, "_int4_gemv_kernel"), ("gemm", {}, qt, "_int4_gemm_kernel"),
             ("int8_gemv", {}, qt, "_int8_gemv_kernel"), ("wgmma", {"BLOCK_M": 64}, qg, "_int4_wgmma_kernel"),
             ("wgmma", {"BLOCK_T": 128, "W_TMA": 1}, qg, "_int4_wgmma_rs_kernel"),
             ("gemv_mma", {"REPS": 2}, qg, "_int4_gemv_mma_kernel"),
             ("gemv_mma", {"REPS": 2, "STAGES": 4}, qg, "_int4_gemv_tma_kernel")]
    for kernel, config, module, name in cases:
        assert kernel_name(kernel, config) == name
        assert getattr(module, name).fn.__name__ == name


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile", [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_stages=4),
                                  dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)])
def test_cuda_packed_dequantization_equals_fp32_dequantization(qt, dtype, tile):
    """DEQUANT=3 makes DEQUANT=1's weight tile by 16-bit ops: the same outputs, bit for bit."""
    _, qw, s, z = int4_weight(300, 1024, 128, seed=8, dtype=dtype)
    x = torch.randn(200, 1024, generator=_gen(28)).to(dtype)
    ys = [qt.int4_gemm(*to("cuda", x, qw, s, z), None, 128, dict(tile, SPLIT_K=1, DEQUANT=d)) for d in (1, 3)]
    assert torch.equal(ys[0], ys[1])


@needs_cuda
@pytest.mark.parametrize("dequant", [1, 3])
@pytest.mark.parametrize("tile", [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_stages=3),
                                  dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, num_warps=8, num_stages=3)])
def test_cuda_int4_gemm_weight_as_second_operand(qt, dequant, tile):
    """W_AS_B: x . W^T, the dequantized weight tile read by the MMA from shared memory; as the reference."""
    q, qw, s, z = int4_weight(300, 1024, 128, seed=11, dtype=torch.bfloat16)
    x, b = torch.randn(200, 1024, generator=_gen(32)).bfloat16(), torch.randn(300, generator=_gen(33)).bfloat16()
    y = qt.int4_gemm(*to("cuda", x, qw, s, z, b), 128, dict(tile, DEQUANT=dequant, W_AS_B=1))
    assert rel_err(y.cpu(), x.float() @ explicit_int4(q, s, z, 128).T + b.float()) < 1e-2


@needs_cuda
@pytest.mark.parametrize("m", [1, 4, 64])
def test_cuda_linear_int8_dispatch(m):
    q, s = int8_weight(1000, 1024, seed=m, dtype=torch.bfloat16)
    x, b = torch.randn(2, m, 1024, generator=_gen(24)).bfloat16(), torch.randn(1000, generator=_gen(25)).bfloat16()
    y = ops.linear_int8(*to("cuda", x, q, s, b))
    assert y.shape == (2, m, 1000)
    assert rel_err(y.cpu(), x.float() @ (q.float() * s.float()[:, None]).T + b.float()) < 1e-2


@needs_cuda
@pytest.mark.parametrize("m", [1, 64])
def test_cuda_linear_w8a8_and_fp8(m):
    q, s = int8_weight(512, 1024, seed=m, dtype=torch.bfloat16)
    sm = (torch.rand(1024, generator=_gen(26)) + 0.5).bfloat16()
    x, b = torch.randn(m, 1024, generator=_gen(27)).bfloat16(), torch.randn(512, generator=_gen(28)).bfloat16()
    y = ops.linear_w8a8(*to("cuda", x, q, s, sm, b))
    assert rel_err(y.cpu(), ops.linear_w8a8(x.float(), q, s.float(), sm.float(), b.float())) < 1e-2
    f8 = (torch.randn(512, 1024, generator=_gen(29)) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    y = ops.linear_fp8(*to("cuda", x, f8, s, b))
    assert rel_err(y.cpu(), x.float() @ (f8.float() * s.float()[:, None]).T + b.float()) < 5e-2


# ---------------------------------------------------------------------------------------------------------
# fake impls: torch.export with a dynamic batch keeps the ops in the graph


def _op_case(name):
    k, n = 64, 24
    q4, qw, s4, z4 = int4_weight(n, k, 32)
    q8, s8 = int8_weight(n, k)
    f8 = (torch.randn(n, k, generator=_gen(30)) * 50).to(torch.float8_e4m3fn)
    b, sm = torch.randn(n, generator=_gen(31)), torch.rand(k, generator=_gen(32)) + 0.5
    return {"linear_int4": (qw, s4, z4, b, 32), "linear_int8": (q8, s8, b), "linear_w8a8": (q8, s8, sm, None),
            "linear_fp8": (f8, s8, None)}[name]


class _OneOp(torch.nn.Module):
    def __init__(self, name, args):
        super().__init__()
        self.op = getattr(ops, name)
        self.args = [a for a in args]
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                self.register_buffer(f"t{i}", a)

    def forward(self, x):
        args = [getattr(self, f"t{i}") if isinstance(a, torch.Tensor) else a for i, a in enumerate(self.args)]
        return F.relu(self.op(x, *args))


@pytest.mark.parametrize("name", ["linear_int4", "linear_int8", "linear_w8a8", "linear_fp8"])
def test_export_keeps_op_with_dynamic_batch(name):
    module = _OneOp(name, _op_case(name))
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(module, (torch.randn(2, 5, 64),), dynamic_shapes={"x": {0: batch}}, strict=False)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert getattr(ops, name).default in targets
    x = torch.randn(7, 5, 64, generator=_gen(33))
    out = ep.module()(x)
    assert out.shape == (7, 5, 24)
    torch.testing.assert_close(out, module(x))


def test_dense_weight_cache_hits_invalidates_and_respects_budget():
    q, s = int8_weight(8, 16)
    made = []

    def make():
        made.append(1)
        return pk.dequantize_int8(q, s)

    cache = ql.DenseWeightCache(max_bytes=None)
    first = cache.get((q, s), torch.float32, make)
    assert cache.get((q, s), torch.float32, make) is first and len(made) == 1
    s.mul_(2)  # in place: the version moves, the dense copy is rebuilt
    assert torch.equal(cache.get((q, s), torch.float32, make), pk.dequantize_int8(q, s)) and len(made) == 2
    q2, s2 = int8_weight(8, 16, seed=1)
    cache.get((q2, s2), torch.float32, lambda: pk.dequantize_int8(q2, s2))
    used = cache.used
    del q2, s2  # the entry dies with its packed weight
    assert cache.used < used and len(cache.entries) == 1
    off = ql.DenseWeightCache(max_bytes=0)
    off.get((q, s), torch.float32, make)
    assert not off.entries and off.used == 0


# ---------------------------------------------------------------------------------------------------------
# the Gluon wgmma GEMM (Hopper only: Gluon has no interpreter)


def _hopper():
    return CUDA and torch.cuda.get_device_capability()[0] == 9


needs_hopper = pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU (Gluon's wgmma kernel)")


@pytest.fixture(scope="module")
def qg():
    from prunus.kernels import quant_linear_gluon
    if quant_linear_gluon.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    return quant_linear_gluon


@needs_hopper
@pytest.mark.parametrize("name", ["m128n128", "m128n64", "m64n128", "m256n128", "m64n64", "m64n128k4", "m128n128k2",
                                  "t256n128", "t256n64", "t128n128", "t128n64", "t64n128", "t128n128k2",
                                  "t128n128r2", "t256n64a", "t128n64a", "t128n128k2a", "t64n64r2a", "t256n64w",
                                  "t128n64aw", "t128n128k2w", "t64n128r2w", "t256n64wp", "t128n128k2wp", "t128n64ap",
                                  "t64n64r2awp", "t128n64k2awps", "t256n64k4awps", "t128n64ws2", "t256n64ws2",
                                  "t64n64ws3", "t128n64k2ws2s", "t128n64ws2k128", "t64n64ws3k128"])
@pytest.mark.parametrize("m, n, k, group", [(200, 300, 2048, 128), (64, 128, 4096, 64), (513, 256, 4096, 256)],
                         ids=["ragged", "one-tile-long-k", "many-row-tiles"])
def test_cuda_int4_wgmma_gemm(qg, name, m, n, k, group):
    """Outputs against the reference; and its weight tile is the dense fallback's weight bit for bit, so the output
    is the fp32 product with that weight rounded once: within one unit in the last place of bf16."""
    dtype = torch.bfloat16
    q, qw, s, z = int4_weight(n, k, group, seed=m, dtype=dtype)
    x, b = torch.randn(m, k, generator=_gen(40)).to(dtype), torch.randn(n, generator=_gen(41)).to(dtype)
    xc, qwc, sc, zc, bc = to("cuda", x, qw, s, z, b)
    y = qg.int4_gemm_wgmma(xc, qwc.view(torch.int32), sc, zc, bc, group, qg.CONFIGS[name])
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y.cpu(), x.float() @ explicit_int4(q, s, z, group).T + b.float()) < 1e-2
    dense = ql.dequantize_int4(qwc, sc, zc, group).to(dtype)
    exact = F.linear(xc.float(), dense.float(), bc.float())
    # one unit in the last place of bf16 (at most 2 ** -7 relative), plus fp32 summation-order noise
    torch.testing.assert_close(y.float(), exact.to(dtype).float(), rtol=2 ** -7, atol=1e-4 * exact.abs().max().item())
    if qg.CONFIGS[name].get("SPLIT_K", 1) > 1:  # the split-K counters (and atomic workspace) are left clean
        again = qg.int4_gemm_wgmma(xc, qwc.view(torch.int32), sc, zc, bc, group, qg.CONFIGS[name])
        torch.testing.assert_close(again.float(), y.float(), rtol=2 ** -7, atol=1e-5 * y.float().abs().max().item())


def _measured_shapes(kernel: str) -> list:
    """(K, N, group, rows bucket, config) of each entry of `kernel` in the measured table, from its key."""
    from prunus.kernels.quant_linear_triton import MEASURED_CONFIGS_PATH

    out = []
    for kernels in json.loads(MEASURED_CONFIGS_PATH.read_text()).values():
        for key, cfg in kernels.get(kernel, {}).items():
            shape, group, bucket = key.split("/")
            out.append((*(int(v) for v in shape.split("x")), int(group[1:]), int(bucket[1:]), cfg))
    return out


def test_every_measured_wgmma_entry_fits_its_shape(qg):
    """On the CPU: each "int4_wgmma" entry of the measured table is a config the kernel takes for the shape it is
    keyed by (tile sizes, split-K dividing the K steps, group), so the op cannot find an entry it must refuse."""
    entries = _measured_shapes("int4_wgmma")
    assert entries
    for k, n, group, m, cfg in entries:
        x = torch.zeros(m, k, dtype=torch.bfloat16)
        words = torch.zeros(n, k // 8, dtype=torch.int32)
        scales, zeros = torch.zeros(n, k // group, dtype=torch.bfloat16), torch.zeros(n, k // group, dtype=torch.uint8)
        assert qg.unfit(x, words, scales, zeros, group, cfg) is None, (k, n, group, m, cfg)


def test_register_operand_wgmma_refuses_configs_and_layouts_it_cannot_take(qg):
    """On the CPU: the register-operand kernel's own checks. Words by TMA (W_TMA=1) need 16-byte aligned rows of
    words too (here 33 words a row: 132 bytes), which the global loads of W_TMA=0 do not; unknown variants are
    refused by name."""
    x = torch.zeros(256, 256, dtype=torch.bfloat16)
    words = torch.zeros(64, 33, dtype=torch.int32)[:, :32]
    scales, zeros = torch.zeros(64, 2, dtype=torch.bfloat16), torch.zeros(64, 2, dtype=torch.uint8)
    assert qg.unfit(x, words, scales, zeros, 128, qg.CONFIGS["t256n64a"]) is None
    assert "rows of the words" in qg.unfit(x, words, scales, zeros, 128, qg.CONFIGS["t256n64w"])
    assert qg.unfit(x, words.contiguous(), scales, zeros, 128, qg.CONFIGS["t256n64w"]) is None
    for bad in (dict(AHEAD=2), dict(W_TMA=2), dict(REPS=4), dict(BLOCK_T=96), dict(P_SMEM=2), dict(SLOTS=2),
                dict(WS=1), dict(WS=4)):
        assert "bad config" in qg.unfit(x, words, scales, zeros, 128, dict(qg.CONFIGS["t256n64w"], **bad))
    # the warp-specialized consumers read words and group parameters from shared memory only, one warp group each
    words = words.contiguous()
    assert qg.unfit(x, words, scales, zeros, 128, qg.CONFIGS["t256n64ws2"]) is None
    for bad in (dict(W_TMA=0), dict(P_SMEM=0), dict(num_warps=8), dict(REPS=2)):
        assert "WS" in qg.unfit(x, words, scales, zeros, 128, dict(qg.CONFIGS["t256n64ws2"], **bad))
    # split-K, with slots too (at BLOCK_T=256 refused until the ready barriers' race was found)
    for ok in (dict(SPLIT_K=2), dict(SPLIT_K=2, SLOTS=1)):
        assert qg.unfit(x, words, scales, zeros, 128, dict(qg.CONFIGS["t256n64ws2"], **ok)) is None
    # WS_K=128 (two k steps a stage): only with WS, and each split's K a multiple of 128
    assert qg.unfit(x, words, scales, zeros, 128, dict(qg.CONFIGS["t256n64ws2"], WS_K=128, SPLIT_K=2)) is None
    assert "WS_K" in qg.unfit(x, words, scales, zeros, 128, dict(qg.CONFIGS["t256n64ws2"], WS_K=128, SPLIT_K=4))
    for bad in (dict(WS_K=96), dict(WS=0, WS_K=128)):
        assert "bad config" in qg.unfit(x, words, scales, zeros, 128, dict(qg.CONFIGS["t256n64ws2"], **bad))


def test_gemv_group_parameter_tables_cover_each_programs_groups(qg):
    """On the CPU: the tensor-core GEMV with XP=1 reads its group parameters from tables of PG rows, the groups
    the steps of 128 of a program touch (split-K gives each ceil(steps / SPLIT_K) steps); XP needs the TMA ring."""
    assert qg._gemv_param_groups(4096, 128, dict(XP=1, SPLIT_K=4, STAGES=4)) == 8  # 32 steps, 8 a program
    assert qg._gemv_param_groups(4096, 128, dict(SPLIT_K=4, STAGES=4)) == 1  # no tables without XP
    assert qg._gemv_param_groups(14336, 128, dict(XP=1, SPLIT_K=16, STAGES=4)) == 8  # 112 steps: 7 a program
    assert qg._gemv_param_groups(14336, 256, dict(XP=1, SPLIT_K=16, STAGES=4)) == 4  # 7 steps across 4 groups
    assert qg._gemv_param_groups(3 * 128, 128, dict(XP=1, SPLIT_K=2, STAGES=4)) == 2  # 2 + 1 steps
    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    words = torch.zeros(256, 512, dtype=torch.int32)
    scales, zeros = torch.zeros(256, 32, dtype=torch.bfloat16), torch.zeros(256, 32, dtype=torch.uint8)
    assert "XP needs STAGES" in qg.gemv_unfit(x, words, scales, zeros, 128, dict(qg.GEMV_CONFIGS["r2w4k4"], XP=1))


def test_register_operand_group_parameter_table_covers_each_programs_groups(qg):
    """On the CPU: with P_SMEM=1 each program reads its group parameters from a table of PG rows, the groups its
    K range touches (a range that starts or ends inside a group touches one more), rounded up to a power of two;
    a table beyond P_SMEM_BYTES of shared memory is refused with the way out."""
    assert qg._param_groups(4096, 128, dict(P_SMEM=1)) == 32  # 64 steps of 64: 32 groups
    assert qg._param_groups(4096, 128, {}) == 1  # no table without P_SMEM
    assert qg._param_groups(4096, 128, dict(P_SMEM=1, SPLIT_K=2)) == 16
    # 14336 = 224 steps; split 4: 56 steps a program, 28 groups of 128
    assert qg._param_groups(14336, 128, dict(P_SMEM=1, SPLIT_K=4)) == 32
    # 6 steps of 64 in groups of 256 (4 steps): split 2 gives programs of 3 steps, the second one across groups
    assert qg._param_groups(384, 256, dict(P_SMEM=1, SPLIT_K=2)) == 2
    assert qg._param_groups(384, 256, dict(P_SMEM=1, SPLIT_K=1)) == 2
    x = torch.zeros(256, 14336, dtype=torch.bfloat16)
    words = torch.zeros(4096, 14336 // 8, dtype=torch.int32)
    scales, zeros = torch.zeros(4096, 112, dtype=torch.bfloat16), torch.zeros(4096, 112, dtype=torch.uint8)
    cfg = dict(qg.CONFIGS["t256n64wp"], num_warps=8)  # 128 rows of 128 groups of 4 bytes: 64 KB
    assert "P_SMEM" in qg.unfit(x, words, scales, zeros, 128, cfg)
    assert qg.unfit(x, words, scales, zeros, 128, dict(cfg, SPLIT_K=4)) is None  # 32 groups: 16 KB


@needs_hopper
@pytest.mark.parametrize("kernel, config", _measured_configs(gluon="int4_wgmma") or [("none", {})],
                         ids=_config_id)
def test_cuda_every_measured_wgmma_config_is_correct(qg, kernel, config):
    if not config:
        pytest.skip("no wgmma config measured")
    n, m = ((16 * config["num_warps"] * config.get("REPS", 1), config["BLOCK_T"]) if "BLOCK_T" in config
            else (config["BLOCK_N"], config["BLOCK_M"]))
    q, qw, s, z = int4_weight(n + 8, 2048, 128, seed=9, dtype=torch.bfloat16)
    x = torch.randn(m + 5, 2048, generator=_gen(43)).bfloat16()
    y = qg.int4_gemm_wgmma(*to("cuda", x), qw.cuda().view(torch.int32), *to("cuda", s, z), None, 128, config)
    assert rel_err(y.cpu(), x.float() @ explicit_int4(q, s, z, 128).T) < 1e-2


@needs_hopper
def test_cuda_linear_int4_dispatches_measured_shapes_to_wgmma(qg, qt, monkeypatch):
    """The op runs the Gluon kernel where the measured table has a wgmma config for the shape and row bucket (same
    output bit for bit), and the Triton kernels elsewhere: other buckets, and shapes the kernel cannot take (here
    groups of 32, under its K step of 64) even with a table entry."""
    config = qg.CONFIGS["m128n64"]
    name = qt._device_name(0)
    table = {name: {"int4_wgmma": {qt.shape_key(100, 256, 2048, 128): config,
                                   qt.shape_key(100, 256, 2048, 32): config}}}
    monkeypatch.setattr(qt, "measured_configs", lambda: table)
    monkeypatch.setattr(ql.dense_cache, "max_bytes", 0)  # (with a dense cache the op takes cuBLAS instead)
    q, qw, s, z = to("cuda", *int4_weight(256, 2048, 128, seed=5, dtype=torch.bfloat16))
    x = torch.randn(100, 2048, generator=_gen(42)).bfloat16().cuda()
    words = qw.view(torch.int32)
    assert qg.config_for(x, words, s, z, 128) == config
    direct = qg.int4_gemm_wgmma(x, words, s, z, None, 128, config)
    calls = []
    kernel = qg.int4_gemm_wgmma
    monkeypatch.setattr(qg, "int4_gemm_wgmma", lambda *args: calls.append(args[-1]) or kernel(*args))
    assert torch.equal(ops.linear_int4(x, qw, s, z, None, 128), direct) and calls == [config]
    ops.linear_int4(x[:40], qw, s, z, None, 128)  # bucket m64: not measured, the Triton kernel
    assert calls == [config]
    _, qw1, s1, z1 = to("cuda", *int4_weight(256, 2048, 32, seed=6, dtype=torch.bfloat16))
    assert qg.config_for(x, qw1.view(torch.int32), s1, z1, 32) is None


@needs_hopper
def test_cuda_int4_wgmma_refuses_what_it_cannot_run(qg):
    _, qw, s, z = to("cuda", *int4_weight(64, 512, 32, dtype=torch.bfloat16))
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    words = qw.view(torch.int32)
    with pytest.raises(ValueError, match="BLOCK_K"):  # a group smaller than the K step
        qg.int4_gemm_wgmma(x, words, s, z, None, 32, qg.CONFIGS["m128n128"])
    with pytest.raises(ValueError, match="integer zero points"):
        qg.int4_gemm_wgmma(x, words, s, z.float(), None, 32, dict(qg.CONFIGS["m128n128"], BLOCK_K=32))
    with pytest.raises(ValueError, match="must be bf16"):
        qg.int4_gemm_wgmma(x.half(), words, s.half(), z, None, 32, dict(qg.CONFIGS["m128n128"], BLOCK_K=32))
    rows_off_16 = torch.randn(64, 516, device="cuda", dtype=torch.bfloat16)[:, :512]  # 1032-byte rows
    with pytest.raises(ValueError, match="TMA"):
        qg.int4_gemm_wgmma(rows_off_16, words, s, z, None, 32, dict(qg.CONFIGS["m128n128"], BLOCK_K=32))


def _compile_offline(config: dict, kernel: str, tmp_path: Path) -> tuple:
    """`qg.compile_for(config, kernel=kernel)` in a subprocess (the interpreter, which the other tests run, patches
    Triton's language objects in this one): (its PTX, written to tmp_path / "k.ptx", and its shared memory)."""
    import os
    import subprocess
    import sys

    script = (f"from prunus.kernels import quant_linear_gluon as qg; "
              f"k = qg.compile_for({config!r}, kernel={kernel!r}); "
              f"open({str(tmp_path / 'k.ptx')!r}, 'w').write(k.asm['ptx']); print(k.metadata.shared)")
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    return (tmp_path / "k.ptx").read_text(), int(done.stdout.split()[-1])


def _offline_sass(ptx: Path) -> tuple:
    """ptxas (Triton's bundled one, sm_90a) on a kernel's PTX, then its SASS by cuobjdump: (SASS, ptxas' -v log)."""
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas

    cubin = ptx.with_suffix(".cubin")
    out = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    cuobjdump = str(Path(get_ptxas(90).path).with_name("cuobjdump"))
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    return sass, out.stderr


@pytest.mark.parametrize("name", ["m128n128", "m64n128k4", "t256n128", "t64n128", "t128n128r2", "t256n64a",
                                  "t64n64r2a", "t128n64aw", "t128n128k2wp", "t128n64k2awps", "t128n64ws2",
                                  "t64n64ws3", "t128n64ws2k128"])
def test_int4_wgmma_compiles_to_asynchronous_wgmmas(qg, name, tmp_path):
    """Offline (no GPU): the kernel compiles for sm_90, fits in shared memory, and ptxas keeps its wgmmas
    asynchronous. A zero-initialized accumulator entering the loop made ptxas serialize them (C7515), which
    would leave the conversion of the next tile unoverlapped; with the weight as the register operand, so would
    its registers redefined while a wgmma reads them (the conversion into them is asserted trivial at compile
    time too). Compiled in a subprocess (`_compile_offline`)."""
    ptx, smem = _compile_offline(qg.CONFIGS[name], "wgmma", tmp_path)
    assert smem <= 227 * 1024  # shared memory a program
    assert ptx.count("wgmma.mma_async") >= 8
    # one wgmma left in flight, except with the weight as the register operand: there ptxas reused the A registers
    # of the MMA in flight for the next conversion, so each MMA completes first
    assert ("wgmma.wait_group.sync.aligned 1;" in ptx) != name.startswith("t")

    sass, ptxas_log = _offline_sass(tmp_path / "k.ptx")
    assert "C7515" not in ptxas_log and "serialized" not in ptxas_log
    if name.startswith("t"):  # and no A register of an HGMMA is written before the wait that retires it
        assert sass.count("HGMMA") >= 8 and qg.wgmma_a_aliasing(sass) == []
        # words by TMA and group parameters from shared memory ("wp", and every WS loop): no global load in the loop
        assert (qg.loop_global_loads(sass) == 0) == ("wp" in name or "ws" in name)
        if qg.CONFIGS[name].get("SLOTS"):  # the epilogue in a layout of 4 consecutive outputs a thread: 16-byte
            # stores and loads of the fp32 slots, no spilled address registers (the atomic epilogue of BLOCK_T=256
            # with split-K 4 spills 274 times offline)
            assert "STG.E.128" in sass and "LDG.E.128" in sass and "STL" not in sass


@needs_hopper
@pytest.mark.parametrize("name", ["t256n64", "t128n64", "t128n128", "t64n64k2", "t128n64ws2k128", "t256n64ws2",
                                  "t64n64ws3k128"])
@pytest.mark.parametrize("m, n, k", [(200, 300, 2048), (64, 128, 4096), (513, 256, 1024)],
                         ids=["ragged", "one-tile-long-k", "many-row-tiles"])
def test_cuda_int8_wgmma_gemm(qg, name, m, n, k):
    """The int8 register-operand kernel against the reference op: the codes convert exactly and their products
    with bf16 x are exact in the fp32 accumulator, so the output is the fp32 product with the dequantized weight
    up to summation order and the scale applied once per sum: within one unit in the last place of bf16."""
    q, s = int8_weight(n, k, seed=m, dtype=torch.bfloat16)
    x, b = torch.randn(m, k, generator=_gen(44)).bfloat16(), torch.randn(n, generator=_gen(45)).bfloat16()
    xc, qc, sc, bc = to("cuda", x, q, s, b)
    y = qg.int8_gemm_wgmma(xc, qc, sc, bc, qg.INT8_CONFIGS[name])
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    exact = x.float() @ (q.float() * s.float()[:, None]).T + b.float()
    torch.testing.assert_close(y.cpu().float(), exact.bfloat16().float(), rtol=2 ** -7,
                               atol=1e-4 * exact.abs().max().item())
    if qg.INT8_CONFIGS[name].get("SPLIT_K", 1) > 1:  # the split-K counters and workspace are left clean
        again = qg.int8_gemm_wgmma(xc, qc, sc, bc, qg.INT8_CONFIGS[name])
        torch.testing.assert_close(again.float(), y.float(), rtol=2 ** -7, atol=1e-5 * y.float().abs().max().item())


def test_every_measured_int8_wgmma_entry_fits_its_shape(qg):
    """On the CPU: each "int8_wgmma" entry of the measured table (group 0: per channel) is a config the kernel
    takes for the shape it is keyed by, so the op cannot find an entry it must refuse."""
    entries = _measured_shapes("int8_wgmma")
    assert entries
    for k, n, group, m, cfg in entries:
        assert group == 0, (k, n, group, m)
        x, words = torch.zeros(m, k, dtype=torch.bfloat16), torch.zeros(n, k // 4, dtype=torch.int32)
        assert qg.int8_unfit(x, words, torch.zeros(n, dtype=torch.bfloat16), cfg) is None, (k, n, m, cfg)


@needs_hopper
@pytest.mark.parametrize("kernel, config", _measured_configs(gluon="int8_wgmma") or [("none", {})],
                         ids=_config_id)
def test_cuda_every_measured_int8_wgmma_config_is_correct(qg, kernel, config):
    if not config:
        pytest.skip("no int8 wgmma config measured")
    n, m = 16 * config["num_warps"] + 8, config["BLOCK_T"] + 5
    q, s = int8_weight(n, 2048, seed=10, dtype=torch.bfloat16)
    x = torch.randn(m, 2048, generator=_gen(46)).bfloat16()
    y = qg.int8_gemm_wgmma(*to("cuda", x, q, s), None, config)
    assert rel_err(y.cpu(), x.float() @ (q.float() * s.float()[:, None]).T) < 1e-2


@needs_hopper
def test_cuda_linear_int8_dispatches_measured_shapes_to_wgmma(qg, qt, monkeypatch):
    """The int8 op runs the Gluon kernel where the measured table has an "int8_wgmma" config for the shape and row
    bucket (same output bit for bit), the Triton weight-only kernel elsewhere, and the GEMV at one row."""
    config = qg.INT8_CONFIGS["t128n64"]
    table = {qt._device_name(0): {"int8_wgmma": {qt.shape_key(100, 256, 2048, 0): config}}}
    monkeypatch.setattr(qt, "measured_configs", lambda: table)
    monkeypatch.setattr(ql.dense_cache, "max_bytes", 0)  # (with a dense cache the op takes cuBLAS instead)
    q, s = to("cuda", *int8_weight(256, 2048, seed=7, dtype=torch.bfloat16))
    x = torch.randn(100, 2048, generator=_gen(47)).bfloat16().cuda()
    assert qg.int8_config_for(x, q, s) == config
    direct = qg.int8_gemm_wgmma(x, q, s, None, config)
    calls = []
    kernel = qg.int8_gemm_wgmma
    monkeypatch.setattr(qg, "int8_gemm_wgmma", lambda *args: calls.append(args[-1]) or kernel(*args))
    assert torch.equal(ops.linear_int8(x, q, s, None), direct) and calls == [config]
    ops.linear_int8(x[:40], q, s, None)  # bucket m64: not measured, the Triton kernel
    ops.linear_int8(x[:1], q, s, None)  # one row: the GEMV
    assert calls == [config]


def test_int8_wgmma_refuses_what_it_cannot_take(qg):
    """On the CPU: the int8 register-operand kernel's own checks, each refusal by name."""
    x = torch.zeros(256, 1024, dtype=torch.bfloat16)
    words = torch.zeros(128, 1024, dtype=torch.int8).view(torch.int32)
    s = torch.zeros(128, dtype=torch.bfloat16)
    cfg = qg.INT8_CONFIGS["t128n64"]
    assert qg.int8_unfit(x, words, s, cfg) is None
    assert "bf16" in qg.int8_unfit(x.half(), words, s.half(), cfg)
    for bad in (dict(BLOCK_T=96), dict(num_warps=2), dict(STAGES=1), dict(AHEAD=1)):
        assert "bad config" in qg.int8_unfit(x, words, s, dict(cfg, **bad))
    assert "multiple of the step" in qg.int8_unfit(x[:, :1000], words, s, cfg)
    assert "SPLIT_K=3" in qg.int8_unfit(x, words, s, dict(cfg, SPLIT_K=3))  # 16 steps
    for bad in (dict(WS=4), dict(WS_K=192)):
        assert "bad config" in qg.int8_unfit(x, words, s, dict(cfg, **bad))
    assert "only with WS" in qg.int8_unfit(x, words, s, dict(cfg, WS_K=128))
    assert "num_warps=4" in qg.int8_unfit(x, words, s, dict(qg.INT8_CONFIGS["t128n128"], WS=2))
    assert "WS_K=128 must divide" in qg.int8_unfit(x[:, :960], words[:, :240], s, dict(cfg, WS=2, WS_K=128))  # 15
    assert qg.int8_unfit(x, words, s, qg.INT8_CONFIGS["t128n64ws2k128"]) is None
    rows_off_16 = torch.zeros(256, 1032, dtype=torch.bfloat16)[:, :1024]  # 2064-byte rows: aligned
    assert qg.int8_unfit(rows_off_16, words, s, cfg) is None
    rows_off_16 = torch.zeros(256, 1028, dtype=torch.bfloat16)[:, :1024]  # 2056-byte rows
    assert "TMA" in qg.int8_unfit(rows_off_16, words, s, cfg)
    with pytest.raises(ValueError, match="bad config"):
        qg.int8_gemm_wgmma(x, words.view(torch.int8), s, None, dict(cfg, BLOCK_T=96))
    assert "per-channel scales [128]" in qg.int8_unfit(x, words, torch.zeros(128, 2, dtype=torch.bfloat16), cfg)
    assert "per-channel scales" in qg.int8_unfit(x, words, torch.zeros(256, dtype=torch.bfloat16)[::2], cfg)
    with pytest.raises(ValueError, match="multiple of the step of 64"):
        qg.int8_gemm_wgmma(x[:, :1000], torch.zeros(128, 1000, dtype=torch.int8), s, None, cfg)


def _linear_index(bases, bits: int) -> tuple:
    """The element a linear layout gives bit pattern `bits` of its hardware index: the XOR of the set bits' bases."""
    out = [0] * len(bases[0]) if bases else [0, 0]
    for i, basis in enumerate(bases):
        if bits >> i & 1:
            out = [a ^ b for a, b in zip(out, basis)]
    return tuple(out)


@pytest.mark.parametrize("num_warps", [4, 8])
def test_int8_wgmma_word_reads_meet_no_bank_conflict(qg, num_warps):
    """On the CPU: the words of an int8 step [16 num_warps, 16] (int32) as `_rs8_words_layout` reads them cover the
    tile (each word by two lanes: the quad's q), and each single-word load of a warp (one register, 32 lanes) reads
    16 words in 16 different banks of the stage `_blocks8` lays out with the TMA's 64-byte swizzle (the 16-byte
    chunk's bits 4-5 of an address XOR its bits 7-8). Unswizzled, the same loads hit a bank four times."""
    layout = qg._rs8_words_layout(num_warps)
    assert qg._blocks8(dict(BLOCK_T=128, num_warps=num_warps))[1][2].swizzle_byte_width == 64

    def bank(row, word, swizzle):
        byte = row * 64 + word * 4
        if swizzle:
            byte ^= ((byte >> 7) & 3) << 4
        return byte // 4 % 32

    seen = set()
    worst = {True: 1, False: 1}
    for warp in range(num_warps):
        for reg in range(2 ** len(layout.reg_bases)):
            at = [tuple(a ^ b ^ c for a, b, c in zip(_linear_index(layout.reg_bases, reg),
                                                     _linear_index(layout.lane_bases, lane),
                                                     _linear_index(layout.warp_bases, warp))) for lane in range(32)]
            seen.update(at)
            for swizzle in (True, False):
                banks = {}
                for row, word in set(at):
                    banks.setdefault(bank(row, word, swizzle), set()).add((row, word))
                worst[swizzle] = max(worst[swizzle], *map(len, banks.values()))
    assert seen == {(r, w) for r in range(16 * num_warps) for w in range(16)}
    assert worst == {True: 1, False: 4}


@needs_hopper
@pytest.mark.parametrize("kernel, config", [
    ("int4", dict(BLOCK_T=256, STAGES=3, WS=2, SLOTS=1, SPLIT_K=4, W_TMA=1, P_SMEM=1, num_warps=4)),
    ("int4", dict(BLOCK_T=64, STAGES=8, WS=3, WS_K=128, W_TMA=1, P_SMEM=1, num_warps=4)),
    ("int8", dict(BLOCK_T=64, STAGES=8, WS=3, SPLIT_K=2, num_warps=4)),
    ("int8", dict(BLOCK_T=256, STAGES=3, WS=2, num_warps=4))], ids=["int4-ws2-stages3", "int4-ws3-stages8",
                                                                     "int8-ws3-stages8", "int8-ws2-stages3"])
def test_cuda_warp_specialized_calls_back_to_back_agree(qg, kernel, config):
    """Warp-specialized configs whose consumers (WS) do not divide the ring's stages, called 40 times back to back
    on a grid of several waves (4096->14336, 256 rows): every output equal and right. With one ready barrier a
    stage, shared by the consumers taking it in turn, a consumer could pass the wait for a stage whose load had not
    landed (an mbarrier's wait sees only a phase's parity): on an H100 the first of these failed to launch within
    ten calls. Each consumer now waits on barriers of its own (`_rs_ws_consume`)."""
    k, n, m = 4096, 14336, 256
    x = torch.randn(m, k, generator=_gen(46)).bfloat16().cuda()
    if kernel == "int4":
        _, words, s, z = to("cuda", *int4_weight(n, k, 128, seed=47, dtype=torch.bfloat16))
        ref = x.float() @ pk.dequantize_int4(words, s, z, 128).float().T
        ys = [qg.int4_gemm_wgmma(x, words.view(torch.int32), s, z, None, 128, config) for _ in range(40)]
    else:
        q, s = to("cuda", *int8_weight(n, k, seed=47, dtype=torch.bfloat16))
        ref = x.float() @ (q.float() * s.float()[:, None]).T
        ys = [qg.int8_gemm_wgmma(x, q, s, None, config) for _ in range(40)]
    for y in ys:
        assert torch.equal(y, ys[0])
    assert ((ys[0].float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("name", ["t256n64", "t128n128", "t64n64k2", "t128n64ws2k128", "t64n64ws3k128"])
def test_int8_wgmma_compiles_to_asynchronous_wgmmas(qg, name, tmp_path):
    """Offline (no GPU): the int8 kernel compiles for sm_90 (its conversions into the wgmma's A layout asserted
    trivial at compile time), fits in shared memory, keeps its wgmmas asynchronous with no A register written
    before the wait that retires it, has no global load in its K loop (words by TMA) and spills nothing."""
    ptx, smem = _compile_offline(qg.INT8_CONFIGS[name], "wgmma8", tmp_path)
    assert smem <= 227 * 1024 and ptx.count("wgmma.mma_async") >= 8
    sass, ptxas_log = _offline_sass(tmp_path / "k.ptx")
    assert "C7515" not in ptxas_log and "serialized" not in ptxas_log and "STL" not in sass
    assert sass.count("HGMMA") >= 8 and qg.wgmma_a_aliasing(sass) == [] and qg.loop_global_loads(sass) == 0


def test_loop_global_loads_counts_the_k_loop_only(qg):
    """The K loop is the shortest backward branch around an MMA: the mbarrier retry that jumps from the end of the
    kernel back into the loop spans the epilogue too, whose loads (split-K's partials) are not the loop's."""
    sass = """
        /*0100*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR8+0x13000], RZ ;
        /*0110*/               @!P1 BRA 0x0300 ;
        /*0120*/                   LDS.128 R16, [R9+UR8+0x10000] ;
        /*0130*/                   HGMMA.64x128x16.F32.BF16 R24, R16, gdesc[UR20], R24, gsb0 ;
        /*0140*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0150*/               @P2 BRA 0x0100 ;
        /*0200*/                   LDG.E R4, desc[UR10][R2.64] ;
        /*0210*/                   EXIT ;
        /*0300*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR8+0x13000], RZ ;
        /*0310*/                   BRA 0x0120 ;
    """
    assert qg.loop_global_loads(sass) == 0
    assert qg.loop_global_loads(sass.replace("LDS.128 R16, [R9+UR8+0x10000]", "LDG.E.128 R16, desc[UR10][R6.64]")) == 1
    with pytest.raises(ValueError, match="no loop"):
        qg.loop_global_loads(sass.replace("HGMMA", "IMAD"))


def test_wgmma_a_aliasing_finds_a_register_written_while_in_flight(qg):
    """The SASS check above on a loop that leaves one wgmma in flight (the shape of ptxas' output that gave wrong
    outputs on the H100): the next conversion writes R169, an A register of the HGMMA still running."""
    sass = """
        /*0100*/                   LOP3.LUT R169, R12, 0xf0f, R15, 0xea, !PT ;
        /*0110*/                   WARPGROUP.ARRIVE ;
        /*0120*/                   HGMMA.64x256x16.F32.BF16 R24, R168, gdesc[UR12], R24, gsb0 ;
        /*0130*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0140*/               @P1 BRA 0x100 ;
    """
    found = qg.wgmma_a_aliasing(sass)
    assert len(found) == 1 and "R169" in found[0]
    assert qg.wgmma_a_aliasing(sass.replace("0x1 ;", "0x0 ;")) == []
    # AHEAD=1's shape: the next conversion between the HGMMA and the wait(0) that retires it, into registers of its
    # own (R176, clean) or into the HGMMA's A registers (R169, caught)
    ahead = """
        /*0100*/                   WARPGROUP.ARRIVE ;
        /*0110*/                   HGMMA.64x256x16.F32.BF16 R24, R168, gdesc[UR12], R24, gsb0 ;
        /*0120*/                   LOP3.LUT R176, R12, 0xf0f, R15, 0xea, !PT ;
        /*0130*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0140*/                   IMAD.MOV.U32 R168, RZ, RZ, R176 ;
        /*0150*/               @P1 BRA 0x100 ;
    """
    assert qg.wgmma_a_aliasing(ahead) == []
    found = qg.wgmma_a_aliasing(ahead.replace("LOP3.LUT R176", "LOP3.LUT R169"))
    assert len(found) == 1 and "R169" in found[0]


# ---------------------------------------------------------------------------------------------------------
# the Gluon tensor-core GEMV (mma.sync: sm_80+; Gluon has no interpreter)


needs_sm80 = pytest.mark.skipif(not (CUDA and torch.cuda.get_device_capability() >= (8, 0)),
                                reason="needs a GPU of compute capability 8.0+ (mma.sync)")


@needs_sm80
@pytest.mark.parametrize("name", ["r1w4k1", "r2w4k4", "r4w8k2", "r1w8k16", "r2w4k4-tma", "r1w4k16-tma", "r2w4k4-xp",
                                  "r1w4k16-xp", "r4w4k1-xp"])
@pytest.mark.parametrize("ones", [1, 0])
@pytest.mark.parametrize("m, n, k, group", [(1, 300, 2048, 128), (8, 256, 4096, 256), (13, 100, 1024, 128),
                                            (16, 512, 3072, 128)],
                         ids=["one-row-ragged-n", "eight-rows-group-256", "two-row-programs", "sixteen-rows"])
def test_cuda_int4_gemv_mma(qg, name, ones, m, n, k, group):
    """Outputs against the fp32 product with the exact weight (q - zero) * scale: the MMA sums exact products in
    fp32, so within one unit in the last place of bf16 plus summation noise (ONES=1 subtracts (128 + zero) sum(x)
    from sums of (128 + q) x: more cancellation, still far below a bf16 unit)."""
    dtype = torch.bfloat16
    q, qw, s, z = int4_weight(n, k, group, seed=m + n, dtype=dtype)
    x, b = torch.randn(m, k, generator=_gen(50)).to(dtype), torch.randn(n, generator=_gen(51)).to(dtype)
    xc, qwc, sc, zc, bc = to("cuda", x, qw, s, z, b)
    config = dict(qg.GEMV_CONFIGS[name.split("-")[0]], ONES=ones)
    if name.endswith(("-tma", "-xp")):  # the words by TMA; with XP x too, and the group parameters from tables
        if not _hopper():
            pytest.skip("STAGES (TMA) needs a Hopper GPU")
        config.update(STAGES=4, XP=int(name.endswith("-xp")))
    for bias in (bc, None):
        y = qg.int4_gemv_mma(xc, qwc.view(torch.int32), sc, zc, bias, group, config)
        assert y.dtype == dtype and y.shape == (m, n)
        exact = x.float() @ explicit_int4(q, s.float(), z, group).T + (b.float() if bias is not None else 0)
        torch.testing.assert_close(y.float().cpu(), exact.to(dtype).float(), rtol=2 ** -7,
                                   atol=1e-4 * exact.abs().max().item())
    # the split-K workspace is left clean: a second call gives the same (up to the order of the fp32 atomics)
    y1 = qg.int4_gemv_mma(xc, qwc.view(torch.int32), sc, zc, bc, group, config)
    torch.testing.assert_close(qg.int4_gemv_mma(xc, qwc.view(torch.int32), sc, zc, bc, group, config), y1,
                               rtol=2 ** -7, atol=1e-5 * y1.abs().max().item())


@needs_sm80
@pytest.mark.parametrize("kernel, config", _measured_configs(gluon="int4_gemv_mma") or [("none", {})],
                         ids=_config_id)
def test_cuda_every_measured_gemv_mma_config_is_correct(qg, kernel, config):
    if not config:
        pytest.skip("no tensor-core GEMV config measured")
    n = 16 * config["REPS"] * config["num_warps"] + 8
    q, qw, s, z = int4_weight(n, 4096, 128, seed=10, dtype=torch.bfloat16)
    x = torch.randn(3, 4096, generator=_gen(52)).bfloat16()
    y = qg.int4_gemv_mma(*to("cuda", x), qw.cuda().view(torch.int32), *to("cuda", s, z), None, 128, config)
    assert rel_err(y.cpu(), x.float() @ explicit_int4(q, s, z, 128).T) < 1e-2


@needs_sm80
def test_cuda_linear_int4_dispatches_measured_shapes_to_gemv_mma(qg, qt, monkeypatch):
    """The op runs the tensor-core GEMV where the measured table has a config for the shape and row bucket (same
    output bit for bit), and the Triton kernels elsewhere: other buckets, and groups it cannot take (64)."""
    config = dict(qg.GEMV_CONFIGS["r2w4k1"], ONES=1)  # no split-K: the same output bit for bit on every call
    name = qt._device_name(0)
    table = {name: {"int4_gemv_mma": {qt.shape_key(1, 256, 2048, 128): config,
                                      qt.shape_key(1, 256, 2048, 64): config}}}
    monkeypatch.setattr(qt, "measured_configs", lambda: table)
    q, qw, s, z = to("cuda", *int4_weight(256, 2048, 128, seed=5, dtype=torch.bfloat16))
    x = torch.randn(1, 2048, generator=_gen(53)).bfloat16().cuda()
    words = qw.view(torch.int32)
    assert qg.gemv_config_for(x, words, s, z, 128) == config
    direct = qg.int4_gemv_mma(x, words, s, z, None, 128, config)
    calls = []
    kernel = qg.int4_gemv_mma
    monkeypatch.setattr(qg, "int4_gemv_mma", lambda *args: calls.append(args[-1]) or kernel(*args))
    assert torch.equal(ops.linear_int4(x, qw, s, z, None, 128), direct) and calls == [config]
    ops.linear_int4(torch.cat([x, x]), qw, s, z, None, 128)  # bucket m2: not measured, the Triton kernel
    assert calls == [config]
    _, qw1, s1, z1 = to("cuda", *int4_weight(256, 2048, 64, seed=6, dtype=torch.bfloat16))
    assert qg.gemv_config_for(x, qw1.view(torch.int32), s1, z1, 64) is None


@needs_sm80
def test_cuda_int4_gemv_mma_refuses_what_it_cannot_run(qg):
    _, qw, s, z = to("cuda", *int4_weight(64, 512, 64, dtype=torch.bfloat16))
    x = torch.randn(2, 512, device="cuda", dtype=torch.bfloat16)
    words, config = qw.view(torch.int32), qg.GEMV_CONFIGS["r1w4k1"]
    with pytest.raises(ValueError, match="multiple of 128"):
        qg.int4_gemv_mma(x, words, s, z, None, 64, config)
    _, qw, s, z = to("cuda", *int4_weight(64, 512, 128, float_zeros=True, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="integer zero points"):
        qg.int4_gemv_mma(x, qw.view(torch.int32), s, z, None, 128, config)
    with pytest.raises(ValueError, match="must be bf16"):
        qg.int4_gemv_mma(x.half(), qw.view(torch.int32), s.half(), z, None, 128, config)
    with pytest.raises(ValueError, match="bad config"):
        qg.int4_gemv_mma(x, qw.view(torch.int32), s, z.round().to(torch.uint8), None, 128, dict(REPS=2))
    with pytest.raises(ValueError, match="K > 0"):
        qg.int4_gemv_mma(x[:, :0], qw.view(torch.int32)[:, :0], s[:, :0], z.round().to(torch.uint8)[:, :0], None,
                         128, config)


@pytest.mark.parametrize("config", [dict(REPS=2, SPLIT_K=4, num_warps=4, ONES=1),
                                    dict(REPS=1, SPLIT_K=1, num_warps=8, ONES=0),
                                    dict(REPS=2, SPLIT_K=1, num_warps=4, ONES=1, STAGES=4),
                                    dict(REPS=2, SPLIT_K=2, num_warps=4, ONES=1, AHEAD=2),
                                    dict(REPS=2, SPLIT_K=4, num_warps=4, ONES=0, STAGES=4, XP=1)],
                         ids=["ones", "minus-zero", "tma", "two-steps-ahead", "tma-x-and-tables"])
def test_int4_gemv_mma_compiles_without_layout_conversions(qg, config, tmp_path):
    """Offline (no GPU): the tensor-core GEMV compiles for sm_90 with its operands converted and loaded straight
    into the MMA's register layout: the conversions are asserted trivial at compile time, and the kernel uses no
    shared memory beyond its TMA ring (STAGES, with XP the x tiles and group-parameter tables too) and the few
    bytes that broadcast split-K's arrival count (a conversion of an operand tile through shared memory would take
    kilobytes more). XP leaves no global load in its loop (SASS). In a subprocess (`_compile_offline`)."""
    ptx, smem = _compile_offline(config, "gemv", tmp_path)
    bn = 16 * config["REPS"] * config["num_warps"]
    ring = config.get("STAGES", 0) * (bn * 64 + 8)  # words by TMA, mbarriers
    if config.get("XP"):  # x tiles [8, 128] in the ring, the group-parameter tables (8 groups of 128 a program)
        ring += config["STAGES"] * 8 * 128 * 2 + 8 * bn * 4 * (1 if config["ONES"] else 2)
    assert ring <= smem <= ring + (16 if config["SPLIT_K"] > 1 else 0)
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") >= 8

    sass, _ = _offline_sass(tmp_path / "k.ptx")
    # XP: x by TMA and the group parameters from tables, so no global load in the loop; else x and the parameters
    # (and without STAGES the words) are loaded in it
    assert (qg.loop_global_loads(sass) == 0) == bool(config.get("XP"))
