"""Quantized linear layers as torch custom ops (`torch.ops.prunus.*`): packed formats, references, dispatch.

Each op has a fake implementation (shapes, for torch.export), a plain-torch reference that runs everywhere
(the CPU implementation), and a CUDA implementation on the Triton kernels of `quant_linear_triton`.
A weight W is [N, K] (out_features, in_features); x [..., K] -> y [..., N] in x's dtype, y = x W^T + bias.

Packed formats:
- int4 (`linear_int4`): asymmetric, groups of `group_size` (G) consecutive input channels:
  W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G], q in 0..15. Storage pads K to whole groups,
  Kp = ceil(K / G) G, with codes 0 there; the reference drops those columns, the kernels pad x with zeros to Kp.
  `qweight` uint8 [N, Kp // 2]: byte j of row n holds k = 2j in its low nibble and k = 2j + 1 in its high
  nibble (the nibble order of ONNX Runtime's MatMulNBits). `scales` [N, Kp // G] in the activation dtype;
  `zeros` uint8 [N, Kp // G], one zero point per byte (0..15); float zero points (HQQ) are accepted too.
- int8 weight-only (`linear_int8`): symmetric per output channel, W = qweight (int8 [N, K]) * scales[:, None]
  (scales [N], activation dtype).
- W8A8 (`linear_w8a8`, SmoothQuant arXiv:2211.10438): weights as int8 weight-only; activations x' = x / smooth
  ([K], optional), quantized per token: a_scale = max|x'_row| / 127 (1 for an all-zero row),
  xq = round_half_even(x' / a_scale).clamp(-127, 127); y = (xq qweight^T, exact int32) * a_scale * scales.
- fp8 (`linear_fp8`): qweight float8_e4m3fn [N, K], W = qweight * scales[:, None] (scales [N]). On Hopper the
  activations are quantized per token to e4m3 too (`torch._scaled_mm` with row-wise scales); the reference
  multiplies by the dequantized weight in x's dtype.
- int8 embedding table (`embedding_int8`): symmetric per row, E = qweight (int8 [V, D]) * scales[:, None] (scales
  [V], the table's dtype); a lookup gathers the rows of ids and scales them in fp32 (the same code on every device:
  a gather moves few bytes, and torch's is as fast as any).

Dispatch on CUDA (thresholds measured on an H100 and an H200, see benchmarks/quant_linear_gpu.py and
BENCHMARKS.md): int4 uses the GEMV kernel up to INT4_GEMV_MAX_ROWS rows (M = product of x's leading dims), the
tensor-core kernel up to INT4_GEMM_MAX_ROWS, and beyond that cuBLAS on a dense copy of the weight
(`DenseWeightCache`). Without a dense cache (the default) the copy is made on every call, which costs more than
the tensor-core kernel up to INT4_GEMM_NO_CACHE_MAX_ROWS rows, so the kernel keeps those (H100, Llama-3-8B shapes,
`quant_linear_gpu.py --explore`: 256 rows 33-102 µs against 32-116 µs for dequantize + cuBLAS; at 512 rows
dequantize + cuBLAS wins on every shape, 37-142 against 60-189). int8 uses the GEMV kernel up to
INT8_GEMV_MAX_ROWS, beyond it the tensor-core weight-only kernel (without a dense cache; it beat dequantizing on
every call at every row count measured, up to 256) or the dense copy when a cache is set; on Hopper without a
dense cache, where
`measured_configs.json` holds an "int8_wgmma" config for the shape and row bucket, the Gluon kernel with the int8
weight as the wgmma's register operand (`quant_linear_gluon.int8_gemm_wgmma`) instead.
On Hopper without a dense cache, int4 calls from INT4_WGMMA_MIN_ROWS rows whose shape and row bucket have a
measured config of a Gluon wgmma kernel (`quant_linear_gluon`: the tiled one, or the one with the weight as the
register operand; `measured_configs.json` keeps one only where it beat the path above in the same run) run that
kernel instead. Likewise int4 calls of up to INT4_GEMV_MMA_MAX_ROWS
rows with a measured config of the Gluon tensor-core GEMV (sm_80+) run it instead of the GEMV or the tensor-core
kernel.
"""
import functools
import os
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

INT4_GEMV_MAX_ROWS = 1
INT4_GEMM_MAX_ROWS = 16
INT4_GEMM_NO_CACHE_MAX_ROWS = 256
INT4_WGMMA_MIN_ROWS = 64
INT4_GEMV_MMA_MAX_ROWS = 16
INT8_GEMV_MAX_ROWS = 1

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------
# packing and dequantization (plain torch, any device)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] with values 0..15 (K even) -> uint8 [N, K // 2], k = 2j low nibble, 2j + 1 high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] (inverse of `pack_int4`)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The int4 weight as [N, K] in the scales' dtype, (q - zero) * scale computed in fp32."""
    q = unpack_int4(qweight).float()
    n, k = q.shape
    w = (q.view(n, k // group_size, group_size) - zeros.float()[:, :, None]) * scales.float()[:, :, None]
    return w.view(n, k).to(scales.dtype)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The int8 per-channel weight as [N, K] in the scales' dtype."""
    return (qweight.float() * scales.float()[:, None]).to(scales.dtype)


def quantize_activations_int8(x: torch.Tensor, smooth: Optional[torch.Tensor] = None):
    """W8A8 activations: x [M, K] -> (xq int8 [M, K], a_scale fp32 [M]) as the module docstring defines."""
    x = x.float()
    if smooth is not None:
        x = x / smooth.float()
    amax = x.abs().amax(dim=-1)
    a_scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(x / a_scale[:, None]).clamp(-127, 127).to(torch.int8), a_scale


# ---------------------------------------------------------------------------------------------------------
# references (the CPU implementations)


def _bias(bias, dtype):
    return None if bias is None else bias.to(dtype)


def linear_int4_reference(x, qweight, scales, zeros, bias, group_size: int) -> torch.Tensor:
    w = dequantize_int4(qweight, scales, zeros, group_size)[:, :x.shape[-1]].to(x.dtype)  # storage pads to whole groups
    return F.linear(x, w, _bias(bias, x.dtype))


def linear_int8_reference(x, qweight, scales, bias) -> torch.Tensor:
    return F.linear(x, dequantize_int8(qweight, scales).to(x.dtype), _bias(bias, x.dtype))


def linear_w8a8_reference(x, qweight, scales, smooth, bias) -> torch.Tensor:
    xq, a_scale = quantize_activations_int8(x.reshape(-1, x.shape[-1]), smooth)
    acc = (xq.double() @ qweight.double().t()).float()  # integer products and sums < 2^53: exact
    y = acc * a_scale[:, None] * scales.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


def linear_fp8_reference(x, qweight, scales, bias) -> torch.Tensor:
    w = (qweight.float() * scales.float()[:, None]).to(x.dtype)
    return F.linear(x, w, _bias(bias, x.dtype))


# ---------------------------------------------------------------------------------------------------------
# the ops


@torch.library.custom_op("prunus::linear_int4", mutates_args=())
def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: Optional[torch.Tensor], group_size: int) -> torch.Tensor:
    """y = x W^T + bias, W int4 in groups along K (packed format: module docstring)."""
    return linear_int4_reference(x, qweight, scales, zeros, bias, group_size)


@torch.library.custom_op("prunus::linear_int8", mutates_args=())
def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = x W^T + bias, W = qweight (int8) * scales[:, None]."""
    return linear_int8_reference(x, qweight, scales, bias)


@torch.library.custom_op("prunus::linear_w8a8", mutates_args=())
def linear_w8a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, smooth: Optional[torch.Tensor],
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """SmoothQuant W8A8: int8 weights per channel, int8 activations per token (dynamic), int32 products."""
    return linear_w8a8_reference(x, qweight, scales, smooth, bias)


@torch.library.custom_op("prunus::embedding_int8", mutates_args=())
def embedding_int8(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """E[ids] for the int8 table E = qweight * scales[:, None], in the scales' dtype."""
    return (qweight[ids].float() * scales[ids].float()[..., None]).to(scales.dtype)


@embedding_int8.register_fake
def _(ids, qweight, scales):
    return ids.new_empty((*ids.shape, qweight.shape[1]), dtype=scales.dtype)


@torch.library.custom_op("prunus::linear_fp8", mutates_args=())
def linear_fp8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = x W^T + bias, W = qweight (float8_e4m3fn) * scales[:, None]."""
    return linear_fp8_reference(x, qweight, scales, bias)


def _out_like(x, qweight):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@linear_int4.register_fake
def _(x, qweight, scales, zeros, bias, group_size):
    return _out_like(x, qweight)


@linear_int8.register_fake
def _(x, qweight, scales, bias):
    return _out_like(x, qweight)


@linear_w8a8.register_fake
def _(x, qweight, scales, smooth, bias):
    return _out_like(x, qweight)


@linear_fp8.register_fake
def _(x, qweight, scales, bias):
    return _out_like(x, qweight)


# ---------------------------------------------------------------------------------------------------------
# CUDA: the Triton kernels, chosen by the number of rows


@functools.cache
def _kernels():
    """The Triton kernel module, or None where Triton is missing (the ops then run their references)."""
    try:
        from prunus.kernels import quant_linear_triton
    except ImportError:
        return None
    return quant_linear_triton


def _gluon_kernels():
    """The Gluon kernel module (the Hopper wgmma GEMM, the tensor-core GEMV), or None where Triton lacks Gluon."""
    try:
        from prunus.kernels import quant_linear_gluon
    except ImportError:
        return None
    return quant_linear_gluon if quant_linear_gluon.gluon is not None else None


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _rows(x):
    return x.reshape(-1, x.shape[-1])


class DenseWeightCache:
    """Dense copies of quantized weights for many-row calls (prefill), where cuBLAS on the dense weight beats
    every fused kernel and dequantizing on every call would cost more than the matmul itself.

    Keyed by the packed tensors' identity and version; an entry dies with its packed weight. Entries are kept
    first come, first served up to `max_bytes` (env PRUNUS_DENSE_CACHE_BYTES). The default is 0, no cache:
    quantizing is usually done to save memory, and a dense copy per weight would undo that; a many-row call
    then dequantizes into a temporary. Setting a budget trades memory for prefill speed. Decode (few rows)
    never touches it.
    """

    def __init__(self, max_bytes: Optional[int]):
        self.max_bytes, self.used, self.entries = max_bytes, 0, {}

    def get(self, tensors: tuple, tag, make):
        """The dense weight for packed `tensors` (the first one owns the entry), made by `make()` on a miss."""
        key = (*map(id, tensors), tag)
        versions = tuple(t._version for t in tensors)
        entry = self.entries.get(key)
        if entry is not None and entry[0]() is tensors[0] and entry[1] == versions:
            return entry[2]
        self._drop(key)
        dense = make()
        size = dense.numel() * dense.element_size()
        if self.max_bytes is None or self.used + size <= self.max_bytes:
            ref = weakref.ref(tensors[0], lambda _, key=key: self._drop(key))
            self.entries[key] = (ref, versions, dense)
            self.used += size
        return dense

    def _drop(self, key):
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.used -= entry[2].numel() * entry[2].element_size()

    def clear(self):
        self.entries.clear()
        self.used = 0


_budget = os.environ.get("PRUNUS_DENSE_CACHE_BYTES", "0")
dense_cache = DenseWeightCache(None if _budget == "unlimited" else int(_budget))


@linear_int4.register_kernel("cuda")
def _linear_int4_cuda(x, qweight, scales, zeros, bias, group_size):
    kernels, K, K_stored = _kernels(), x.shape[-1], 2 * qweight.shape[-1]
    if (kernels is None or x.dtype not in FLOAT_DTYPES or K_stored % group_size or not K <= K_stored < K + group_size
            or not (_is_pow2(group_size) and group_size >= 8)):
        return linear_int4_reference(x, qweight, scales, zeros, bias, group_size)
    x2 = _rows(x)
    if K_stored != K:  # a partial last group (SmolLM2's K = 576 in groups of 128): zeros meet the storage's padding
        x2 = F.pad(x2, (0, K_stored - K))
    bias = _bias(bias, x.dtype)
    M = x2.shape[0]
    few = M <= INT4_GEMV_MMA_MAX_ROWS
    gluon = _gluon_kernels() if few or (M >= INT4_WGMMA_MIN_ROWS and dense_cache.max_bytes == 0) else None
    words = qweight.contiguous().view(torch.int32) if gluon is not None else None
    gemv_mma = gluon.gemv_config_for(x2, words, scales, zeros, group_size) if gluon is not None and few else None
    wgmma = gluon.config_for(x2, words, scales, zeros, group_size) if gluon is not None and not few else None
    if gemv_mma is not None:
        y = gluon.int4_gemv_mma(x2, words, scales, zeros, bias, group_size, gemv_mma)
    elif M <= INT4_GEMV_MAX_ROWS and group_size <= 512:
        y = kernels.int4_gemv(x2, qweight, scales, zeros, bias, group_size)
    elif wgmma is not None:
        y = gluon.int4_gemm_wgmma(x2, words, scales, zeros, bias, group_size, wgmma)
    elif group_size >= 16 and (M <= INT4_GEMM_MAX_ROWS or (M <= INT4_GEMM_NO_CACHE_MAX_ROWS
                                                        and dense_cache.max_bytes == 0)):
        y = kernels.int4_gemm(x2, qweight, scales, zeros, bias, group_size)
    else:
        dense = dense_cache.get((qweight, scales, zeros), (group_size, x.dtype),
                                lambda: kernels.int4_dequantize(qweight, scales, zeros, group_size, x.dtype))
        y = F.linear(x2, dense, bias)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


@linear_int8.register_kernel("cuda")
def _(x, qweight, scales, bias):
    kernels, x2 = _kernels(), _rows(x)
    bias = _bias(bias, x.dtype)
    fits = kernels is not None and x.dtype in FLOAT_DTYPES and x.shape[-1] % 4 == 0
    gluon = _gluon_kernels() if fits and x2.shape[0] > INT8_GEMV_MAX_ROWS and dense_cache.max_bytes == 0 else None
    wgmma = gluon.int8_config_for(x2, qweight, scales) if gluon is not None else None
    if fits and x2.shape[0] <= INT8_GEMV_MAX_ROWS:
        y = kernels.int8_gemv(x2, qweight, scales, bias)
    elif wgmma is not None:
        y = gluon.int8_gemm_wgmma(x2, qweight, scales, bias, wgmma)
    elif fits and dense_cache.max_bytes == 0:
        y = kernels.int8_gemm_weight_only(x2, qweight, scales, bias)
    else:
        dense = dense_cache.get((qweight, scales), x.dtype, lambda: dequantize_int8(qweight, scales).to(x.dtype))
        y = F.linear(x2, dense, bias)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


@linear_w8a8.register_kernel("cuda")
def _(x, qweight, scales, smooth, bias):
    kernels = _kernels()
    if kernels is None or x.dtype not in FLOAT_DTYPES:
        return linear_w8a8_reference(x, qweight, scales, smooth, bias)
    xq, a_scale = kernels.quantize_rows(_rows(x), smooth, torch.int8)
    y = kernels.int8_gemm(xq, a_scale, qweight, scales, _bias(bias, x.dtype), x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


@linear_fp8.register_kernel("cuda")
def _(x, qweight, scales, bias):
    kernels, x2 = _kernels(), _rows(x)
    N, K = qweight.shape
    if (kernels is None or x.dtype not in FLOAT_DTYPES or torch.cuda.get_device_capability(x.device) < (9, 0)
            or K % 16 or N % 16 or x2.shape[0] == 0):
        return linear_fp8_reference(x, qweight, scales, bias)
    xq, a_scale = kernels.quantize_rows(x2, None, torch.float8_e4m3fn)
    y = torch._scaled_mm(xq, qweight.t(), scale_a=a_scale[:, None], scale_b=scales.float()[None, :],
                         out_dtype=torch.bfloat16).to(x.dtype)
    if bias is not None:
        y += bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], N)
