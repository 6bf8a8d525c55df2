"""Code generation: `triton` (fused kernels; registers the `fuse` pass) and `onnx` (export)."""
from prunus.codegen import triton  # noqa: F401  (registers the fuse pass and the prunus::fused op)
