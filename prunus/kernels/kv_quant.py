"""KIVI-style quantized KV cache: packed formats, quantize/dequantize helpers, a reference, and the op
`torch.ops.prunus.decode_attention_quantized` (KIVI, arXiv:2402.02750: keys per channel, values per token,
asymmetric, the most recent tokens in full precision), and `decode_attention_quantized_scores`, which also returns
the attention probabilities per entry (as `decode_attention_scores`) for the eviction policies.

Attention of the new tokens over a cache of three parts, in sequence order: `n_q` quantized entries, `r`
full-precision residual entries (the most recent ones, r < group_size in the KIVI scheme: the caller quantizes
the residual block with `quantize_keys` / `quantize_values` once it holds `group_size` entries and appends it to
the quantized part), then the t new tokens (causal among themselves, as in `decode_attention`). Output and
GQA conventions are those of `prunus.kernels.decode_attention`: q [b, h, t, d] -> out [b, h, t, dv] in q's dtype.

Layout (G = group_size, a power of two; bits B in {8, 4}; every tensor [b, hk, ...]):
- keys, per channel: groups of G consecutive tokens of one channel share a scale and a minimum.
  `k_q` uint8 [b, hk, n_q, d * B / 8], token-major; `k_scale`, `k_min` [b, hk, n_q / G, d]; n_q % G == 0.
  K[b, g, i, c] = q(i, c) * k_scale[b, g, i // G, c] + k_min[b, g, i // G, c].
- values, per token: groups of VG = min(G, dv) consecutive channels of one token share a scale and a minimum.
  `v_q` uint8 [b, hk, n_q, dv * B / 8]; `v_scale`, `v_min` [b, hk, n_q, dv / VG]; dv % VG == 0.
  V[b, g, i, c] = q(i, c) * v_scale[b, g, i, c // VG] + v_min[b, g, i, c // VG].
- packing: B = 8, byte c of a row is channel c; B = 4, byte j holds channel 2j in its low nibble and 2j + 1
  in its high nibble (d and dv even). q in 0 .. 2^B - 1.
- `k_scale`, `k_min`, `v_scale`, `v_min`: one float dtype (by default the cache's; fp32 always works).
  The helpers round the stored minimum down and the stored scale up, so the grid min + q * scale covers
  the group's range exactly and every entry dequantizes within scale / 2 of its value.
- `k_res` [b, hk, r, d], `v_res` [b, hk, r, dv] (r may be 0), `k_new` [b, hk, t, d], `v_new` [b, hk, t, dv]:
  q's dtype.
Any strides on the batch, head and sequence dims are accepted (the last dim contiguous), so a preallocated
buffer can be passed as a slice `[:, :, :n_q]`.

On CUDA both ops run the flash-decoding kernel of `kv_quant_triton`, which reads the packed bytes directly
(no dequantized copy in memory; for the scores op it also stores each row's scores, and a second kernel turns them
into the entries' probabilities, or recomputes them from the packed keys where that reads fewer bytes); elsewhere,
and for shapes the kernels do not take, the reference.
"""
from __future__ import annotations

import functools

import torch

from prunus.kernels.decode_attention import FLOAT_DTYPES, MAX_KERNEL_HEAD_DIM, decode_attention_reference

BITS = (8, 4)


def value_group(group_size: int, dv: int) -> int:
    """Channels per value group: the group size, or the whole head where the head is narrower."""
    return min(group_size, dv)


def _check_bits(bits: int, width: int):
    if bits not in BITS:
        raise ValueError(f"kv_quant: bits must be one of {BITS}, got {bits}")
    if bits == 4 and width % 2:
        raise ValueError(f"kv_quant: 4-bit packing needs an even head dim, got {width}")


# ---------------------------------------------------------------------------------------------------------
# packing, quantize, dequantize (plain torch, any device)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., c] in 0..2^bits-1 -> uint8 [..., c * bits / 8] (4 bits: 2j low nibble, 2j + 1 high)."""
    q = q.to(torch.uint8)
    return q if bits == 8 else q[..., 0::2] | (q[..., 1::2] << 4)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`."""
    if bits == 8:
        return packed
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def _grid(lo: torch.Tensor, hi: torch.Tensor, qmax: int, dtype: torch.dtype):
    """(scale, minimum) stored in `dtype` such that minimum + q * scale, q in 0..qmax, covers [lo, hi]."""
    mn = lo.to(dtype)
    mn = torch.where(mn.float() > lo, torch.nextafter(mn, torch.full_like(mn, float("-inf"))), mn)
    scale = ((hi - mn.float()) / qmax).to(dtype)
    short = scale.float() * qmax + mn.float() < hi
    scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    return torch.where(scale > 0, scale, torch.ones_like(scale)), mn  # a constant group: q = 0, min exact


def _quantize(x: torch.Tensor, dim: int, bits: int, meta_dtype):
    """Asymmetric quantization of fp32 x over `dim` (the group axis): (q uint8, scale, min), keepdim."""
    qmax = (1 << bits) - 1
    scale, mn = _grid(x.amin(dim, keepdim=True), x.amax(dim, keepdim=True), qmax, meta_dtype)
    q = torch.round((x - mn.float()) / scale.float()).clamp(0, qmax).to(torch.uint8)
    return q, scale, mn


def quantize_keys(k: torch.Tensor, bits: int, group_size: int, meta_dtype: torch.dtype | None = None):
    """k [b, hk, n, d] (n % group_size == 0) -> (k_q, k_scale, k_min) in the module's layout."""
    b, hk, n, d = k.shape
    _check_bits(bits, d)
    if n % group_size:
        raise ValueError(f"quantize_keys: {n} tokens is not a whole number of groups of {group_size}")
    x = k.float().reshape(b, hk, n // group_size, group_size, d)
    q, scale, mn = _quantize(x, 3, bits, meta_dtype or k.dtype)
    return pack(q.reshape(b, hk, n, d), bits), scale.squeeze(3), mn.squeeze(3)


def quantize_values(v: torch.Tensor, bits: int, group_size: int, meta_dtype: torch.dtype | None = None):
    """v [b, hk, n, dv] -> (v_q, v_scale, v_min) in the module's layout (groups of min(group_size, dv) channels)."""
    b, hk, n, dv = v.shape
    _check_bits(bits, dv)
    vg = value_group(group_size, dv)
    if dv % vg:
        raise ValueError(f"quantize_values: head dim {dv} is not a whole number of groups of {vg}")
    x = v.float().reshape(b, hk, n, dv // vg, vg)
    q, scale, mn = _quantize(x, 4, bits, meta_dtype or v.dtype)
    return pack(q.reshape(b, hk, n, dv), bits), scale.squeeze(4), mn.squeeze(4)


def dequantize_keys(k_q, k_scale, k_min, bits: int, group_size: int) -> torch.Tensor:
    """fp32 [b, hk, n_q, d]."""
    q = unpack(k_q, bits).float()
    rep = lambda m: m.float().repeat_interleave(group_size, dim=2)  # noqa: E731
    return q * rep(k_scale) + rep(k_min)


def dequantize_values(v_q, v_scale, v_min, bits: int, group_size: int) -> torch.Tensor:
    """fp32 [b, hk, n_q, dv]."""
    q = unpack(v_q, bits).float()
    vg = value_group(group_size, q.shape[-1])
    rep = lambda m: m.float().repeat_interleave(vg, dim=3)  # noqa: E731
    return q * rep(v_scale) + rep(v_min)


# ---------------------------------------------------------------------------------------------------------
# reference and op


def _check(q, k_q, k_scale, v_q, v_scale, k_res, v_res, k_new, bits, group_size):
    d, dv = q.shape[-1], v_res.shape[-1]
    _check_bits(bits, d)
    _check_bits(bits, dv)
    n_q = k_q.shape[2]
    if (group_size <= 0 or group_size & (group_size - 1) or n_q % group_size or k_q.shape[-1] * 8 != d * bits
            or v_q.shape[-1] * 8 != dv * bits or k_scale.shape[2] * group_size != n_q or v_q.shape[2] != n_q
            or v_scale.shape[-1] * value_group(group_size, dv) != dv or k_res.shape[2] != v_res.shape[2]
            or k_new.shape[2] != q.shape[2]):
        raise ValueError(f"decode_attention_quantized: shapes do not fit the layout (bits {bits}, group {group_size}): "
                         f"q {tuple(q.shape)}, k_q {tuple(k_q.shape)}, k_scale {tuple(k_scale.shape)}, "
                         f"v_q {tuple(v_q.shape)}, v_scale {tuple(v_scale.shape)}, k_res {tuple(k_res.shape)}")


def decode_attention_quantized_reference(q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new, v_new,
                                         scale: float, bits: int, group_size: int) -> torch.Tensor:
    """Dequantize, then `decode_attention_reference` over [quantized, residual] as the past (fp32 throughout)."""
    _check(q, k_q, k_scale, v_q, v_scale, k_res, v_res, k_new, bits, group_size)
    k = torch.cat([dequantize_keys(k_q, k_scale, k_min, bits, group_size), k_res.float()], dim=2)
    v = torch.cat([dequantize_values(v_q, v_scale, v_min, bits, group_size), v_res.float()], dim=2)
    return decode_attention_reference(q, k, v, k_new.float(), v_new.float(), scale)


def decode_attention_quantized_scores_reference(q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new,
                                                v_new, scale: float, bits: int, group_size: int):
    """(out, probs) of `decode_attention_quantized_scores`, on the dequantized cache."""
    _check(q, k_q, k_scale, v_q, v_scale, k_res, v_res, k_new, bits, group_size)
    k = torch.cat([dequantize_keys(k_q, k_scale, k_min, bits, group_size), k_res.float()], dim=2)
    v = torch.cat([dequantize_values(v_q, v_scale, v_min, bits, group_size), v_res.float()], dim=2)
    return decode_attention_reference(q, k, v, k_new.float(), v_new.float(), scale, return_probs=True)


@torch.library.custom_op("prunus::decode_attention_quantized", mutates_args=())
def decode_attention_quantized(q: torch.Tensor, k_q: torch.Tensor, k_scale: torch.Tensor, k_min: torch.Tensor,
                               v_q: torch.Tensor, v_scale: torch.Tensor, v_min: torch.Tensor, k_res: torch.Tensor,
                               v_res: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, scale: float,
                               bits: int, group_size: int) -> torch.Tensor:
    """Attention of q over [quantized cache, residual, new tokens] (layout: module docstring)."""
    return decode_attention_quantized_reference(q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new,
                                                v_new, scale, bits, group_size)


@decode_attention_quantized.register_fake
def _(q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new, v_new, scale, bits, group_size):
    return q.new_empty(*q.shape[:3], v_res.shape[-1])


@torch.library.custom_op("prunus::decode_attention_quantized_scores", mutates_args=())
def decode_attention_quantized_scores(q: torch.Tensor, k_q: torch.Tensor, k_scale: torch.Tensor, k_min: torch.Tensor,
                                      v_q: torch.Tensor, v_scale: torch.Tensor, v_min: torch.Tensor,
                                      k_res: torch.Tensor, v_res: torch.Tensor, k_new: torch.Tensor,
                                      v_new: torch.Tensor, scale: float, bits: int,
                                      group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_attention_quantized`, plus the probabilities `decode_attention_scores` returns (for the policies
    that score by attention): fp32 [b, hk, n_q + r + t], each entry's attention summed over its group's rows."""
    return decode_attention_quantized_scores_reference(q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res,
                                                       k_new, v_new, scale, bits, group_size)


@decode_attention_quantized_scores.register_fake
def _(q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new, v_new, scale, bits, group_size):
    total = k_q.shape[2] + k_res.shape[2] + k_new.shape[2]
    return (q.new_empty(*q.shape[:3], v_res.shape[-1]),
            q.new_empty(k_q.shape[0], k_q.shape[1], total, dtype=torch.float32))


@functools.cache
def _kernels():
    try:
        from prunus.kernels import kv_quant_triton
    except ImportError:
        return None
    return kv_quant_triton


def _kernel_fits(q, k_scale, k_min, v_scale, v_min, k_res, v_res, k_new, v_new, group_size) -> bool:
    return (_kernels() is not None and q.dtype in FLOAT_DTYPES and group_size >= 16 and q.shape[2] > 0
            and all(x.dtype == q.dtype for x in (k_res, v_res, k_new, v_new))
            and all(m.dtype in FLOAT_DTYPES for m in (k_scale, k_min, v_scale, v_min))
            and max(q.shape[-1], v_res.shape[-1]) <= MAX_KERNEL_HEAD_DIM)


def _on_cuda(args: tuple, kernel: str, reference):
    """The Triton kernel `kernel` of kv_quant_triton where it takes the arguments, else `reference`."""
    q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new, v_new, scale, bits, group_size = args
    _check(q, k_q, k_scale, v_q, v_scale, k_res, v_res, k_new, bits, group_size)
    if not _kernel_fits(q, k_scale, k_min, v_scale, v_min, k_res, v_res, k_new, v_new, group_size):
        return reference(*args)
    return getattr(_kernels(), kernel)(*args)


@decode_attention_quantized.register_kernel("cuda")
def _(q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new, v_new, scale, bits, group_size):
    return _on_cuda((q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new, v_new, scale, bits,
                     group_size), "decode_attention_quantized", decode_attention_quantized_reference)


@decode_attention_quantized_scores.register_kernel("cuda")
def _(q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new, v_new, scale, bits, group_size):
    return _on_cuda((q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new, v_new, scale, bits,
                     group_size), "decode_attention_quantized_scores", decode_attention_quantized_scores_reference)
