"""ONNX lowering of prunus graphs."""
from prunus.codegen.onnx.export import check_parity, export_onnx, run_onnx

__all__ = ["check_parity", "export_onnx", "run_onnx"]
