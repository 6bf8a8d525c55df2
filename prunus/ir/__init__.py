"""The IR: capture with torch.export, the `Graph` wrapper, analyses and the printer."""
from prunus.ir.capture import capture
from prunus.ir.graph import Graph, layer_index, module_path
from prunus.ir.printer import to_json, to_text

__all__ = ["Graph", "capture", "layer_index", "module_path", "to_json", "to_text"]
