"""Round-to-nearest: each weight goes to the nearest point of its grid (min-max per group or channel)."""
from __future__ import annotations

from prunus.passes.quant.encode import QuantizedWeight, encode


def rtn(w, scheme: str, group_size: int, dtype, stats=None, *, symmetric: bool = False) -> QuantizedWeight:
    return encode(scheme, w, group_size, dtype, symmetric=symmetric)
