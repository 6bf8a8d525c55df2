"""ONNX lowering of prunus graphs, and the KV graphs (prefill/decode) run in onnxruntime."""
from prunus.codegen.onnx.export import check_parity, export_onnx, run_onnx
from prunus.codegen.onnx.kv import OrtKVDecoder, export_kv_onnx

__all__ = ["OrtKVDecoder", "check_parity", "export_kv_onnx", "export_onnx", "run_onnx"]
