"""Exact clean-up passes: dce, fold_constants, simplify_masks."""
from prunus.passes.cleanup import dce, fold_constants, simplify_masks  # noqa: F401  (registers the passes)
