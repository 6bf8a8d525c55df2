"""prunus: a compiler for cheaper transformer inference (capture, verified passes, Triton and ONNX)."""
__version__ = "0.1.0"

from prunus import data, eval, ir, models, passes
from prunus.api import OptimizedModel, load, optimize, report_table
from prunus.generate import generate
from prunus.errors import (ArtifactError, CaptureError, ExportError, InputError, PassError, PrunusError, SpecError,
                           VerificationError)

__all__ = ["ArtifactError", "CaptureError", "ExportError", "InputError", "OptimizedModel", "PassError",
           "PrunusError", "SpecError", "VerificationError", "data", "eval", "generate", "ir", "load", "models", "optimize", "passes",
           "report_table"]
