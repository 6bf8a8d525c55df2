"""Triton code generation: partition the graph into fusible regions, emit a kernel per region, run it.

Importing this package registers the `fuse` pass and the `prunus::fused` op; Triton itself is imported
only when a kernel first runs.
"""
from prunus.codegen.triton.emit import emit
from prunus.codegen.triton.fuse import Fuse, replace_region
from prunus.codegen.triton.partition import PATTERNS, Region, classify, partition
from prunus.codegen.triton.runtime import (fused_nodes, get_kernel, inline_fused, kernels_of, load_kernels,
                                           register_kernel, save_kernels)

__all__ = ["PATTERNS", "Fuse", "Region", "classify", "emit", "fused_nodes", "get_kernel", "inline_fused",
           "kernels_of", "load_kernels", "partition", "register_kernel", "replace_region", "save_kernels"]
