"""Quantization passes: `quantize` (int8/int4 weight-only, W8A8, FP8; rtn, gptq, awq, hqq, smoothquant)."""
from prunus.passes.quant import quantize  # noqa: F401  (registers the pass)
