"""Quantization grids: how a weight matrix maps to integers (or fp8) and back.

- int4: asymmetric groups of `group_size` along the input dim; W ~ (q - z) * s with q, z in 0..15. When K is
  not a multiple of the group size, the last group is partial (its padding is zero and never multiplied).
  Symmetric (`symmetric=True`, GPTQ's "sym"): z = 8 and s = 2 max|W| / 15 over the group, so 0 is exact and the
  grid runs from -8 s to 7 s; the storage is the same.
- int8: symmetric per output channel; W ~ q * s with q in -127..127.
- fp8: e4m3 per output channel; W ~ q * s with s = max|W| / 448.
`fake` returns the dequantized weight a grid represents (what quality searches compare against).
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0


def pad_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """`w` [N, K] with zero columns appended up to a whole number of groups."""
    extra = -w.shape[1] % group_size
    return torch.nn.functional.pad(w, (0, extra)) if extra else w


def _expand(t: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    return t.repeat_interleave(group_size, 1)[:, :k]


def int4_params(w: torch.Tensor, group_size: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min-max scale and integer zero point: ([N, ceil(K/G)], [N, ceil(K/G)]); symmetric: z = 8,
    s = 2 max|W| / 15.

    Zero padding of a partial last group changes nothing: the range always includes 0.
    """
    g = pad_groups(w, group_size).reshape(w.shape[0], -1, group_size)
    if symmetric:
        scale = (2 * g.abs().amax(-1) / 15).clamp(min=1e-10)
        return scale, torch.full_like(scale, 8.0)
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    zero = (-lo / scale).round().clamp(0, 15)
    return scale, zero


def int4_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """q in 0..15 as uint8 [N, K]."""
    s, z = _expand(scale, group_size, w.shape[1]), _expand(zero, group_size, w.shape[1])
    return (w / s + z).round().clamp(0, 15).to(torch.uint8)


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    k = q.shape[1]
    return (q.float() - _expand(zero.float(), group_size, k)) * _expand(scale, group_size, k)


def int4_fake(w: torch.Tensor, group_size: int, symmetric: bool = False) -> torch.Tensor:
    scale, zero = int4_params(w, group_size, symmetric)
    return int4_dequantize(int4_quantize(w, scale, zero, group_size), scale, zero, group_size)


def int8_params(w: torch.Tensor) -> torch.Tensor:
    return (w.abs().amax(1) / 127).clamp(min=1e-10)


def int8_quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)


def int8_fake(w: torch.Tensor) -> torch.Tensor:
    scale = int8_params(w)
    return int8_quantize(w, scale).float() * scale[:, None]


def fp8_params(w: torch.Tensor) -> torch.Tensor:
    return (w.abs().amax(1) / FP8_MAX).clamp(min=1e-12)


def fp8_quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_fake(w: torch.Tensor) -> torch.Tensor:
    scale = fp8_params(w)
    return fp8_quantize(w, scale).float() * scale[:, None]


FAKE = {"int4_weight": lambda w, g, symmetric=False: int4_fake(w, g, symmetric),
        "int8_weight": lambda w, g, symmetric=False: int8_fake(w), "w8a8": lambda w, g, symmetric=False: int8_fake(w),
        "fp8": lambda w, g, symmetric=False: fp8_fake(w)}  # int8 and fp8 are symmetric already
