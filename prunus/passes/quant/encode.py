"""`QuantizedWeight`: what a quantization method hands the pass, in the argument order of the prunus ops.

The packed formats are those of `prunus.kernels.quant_linear` (documented there): int4 two values a
byte, low nibble first, with per-group scales and zero points; int8 and fp8 per output channel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunus.passes.quant import grids


@dataclass
class QuantizedWeight:
    scheme: str
    tensors: list  # the op's weight arguments after x: (qweight, scales[, zeros])
    smooth: torch.Tensor | None = None  # w8a8: the op divides x by this (SmoothQuant)
    input_scale: torch.Tensor | None = None  # AWQ: x is multiplied by this before the op
    in_features: int = 0  # K (int4 storage is padded to whole groups)

    def dequantize(self, group_size: int) -> torch.Tensor:
        """The weight the op effectively multiplies by (in terms of its own, possibly scaled, input)."""
        from prunus.kernels.quant_linear import unpack_int4

        if self.scheme == "int4_weight":
            qweight, scales, zeros = self.tensors
            w = grids.int4_dequantize(unpack_int4(qweight), scales.float(), zeros.float(), group_size)
            return w[:, :self.in_features] if self.in_features else w
        qweight, scales = self.tensors
        return qweight.float() * scales.float()[:, None]


def encode(scheme: str, w: torch.Tensor, group_size: int, dtype: torch.dtype, *, q=None, scale=None,
           zero=None, symmetric: bool = False) -> QuantizedWeight:
    """Quantize `w` [N, K] (fp32) on the scheme's grid, with given grid params / integer values if any
    (`symmetric`: int4's symmetric grid, see `grids`)."""
    from prunus.kernels.quant_linear import pack_int4

    if scheme == "int4_weight":
        if scale is None:
            scale, zero = grids.int4_params(w, group_size, symmetric)
        if q is None:
            q = grids.int4_quantize(w, scale, zero, group_size)
        zeros = zero.to(torch.uint8) if torch.equal(zero, zero.round()) else zero.to(dtype)
        # stored padded to whole groups: [N, ceil(K/G) * G / 2] bytes, as MatMulNBits lays out its blocks
        return QuantizedWeight(scheme, [pack_int4(grids.pad_groups(q, group_size)), scale.to(dtype), zeros],
                               in_features=w.shape[1])
    if scheme in ("int8_weight", "w8a8"):
        scale = grids.int8_params(w) if scale is None else scale
        q = grids.int8_quantize(w, scale) if q is None else q
        return QuantizedWeight(scheme, [q, scale.to(dtype)])
    if scheme == "fp8":
        scale = grids.fp8_params(w) if scale is None else scale
        return QuantizedWeight(scheme, [grids.fp8_quantize(w, scale), scale.to(dtype)])
    raise ValueError(f"unknown scheme {scheme!r}")
