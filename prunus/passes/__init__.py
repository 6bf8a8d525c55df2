"""Passes, their registry, the pipeline parser and the manager."""
from prunus.passes import cleanup, kv, prune, quant, tokens  # noqa: F401  (registers the passes)
from prunus.passes.base import LossyParams, NoParams, Pass, PassContext, PassResult, param
from prunus.passes.cleanup.dce import DeadCodeElimination
from prunus.passes.cleanup.fold_constants import FoldConstants
from prunus.passes.cleanup.simplify_masks import SimplifyMasks
from prunus.passes.manager import PassManager, PassRecord
from prunus.passes.parser import parse_pipeline
from prunus.passes.registry import build_pipeline, register, registry

__all__ = ["DeadCodeElimination", "FoldConstants", "LossyParams", "NoParams", "Pass", "PassContext", "PassManager",
           "PassRecord", "PassResult", "SimplifyMasks", "build_pipeline", "param", "parse_pipeline", "register",
           "registry"]
