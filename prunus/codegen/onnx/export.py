"""ONNX export with dynamic batch and sequence, `onnx.checker`, and a parity check in onnxruntime."""
from __future__ import annotations

import logging
import os
import re
import tempfile
import warnings

import numpy as np
import torch

from prunus.codegen.onnx.translations import translation_table
from prunus.errors import ExportError

# Above this many parameter bytes the weights go to an external data file (protobuf caps a file at 2 GB).
EXTERNAL_DATA_BYTES = 1 << 30
_OP = re.compile(r"((?:aten|prims|prunus|torch\.ops\.\w+)[.:]+[\w.]+)")


def failed_op(e: BaseException) -> str:
    text = f"{e}\n{e.__cause__ or ''}"
    m = _OP.search(text)
    return m.group(1) if m else "unknown op"


def export_onnx(graph, path: str, *, check: bool = True, opset: int | None = None) -> str:
    """Write `graph` to `path` as ONNX (atomically), check it, and compare onnxruntime with PyTorch."""
    input_names = [info.name for info in graph.inputs]
    output_names = graph.output_names()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    large = sum(p.numel() * p.element_size() for p in graph.gm.parameters()) > EXTERNAL_DATA_BYTES
    with tempfile.TemporaryDirectory(dir=directory, prefix=".prunus-onnx-") as tmp:
        tmp_path = os.path.join(tmp, os.path.basename(path))
        # Exporting the (cached) ExportedProgram skips a second trace of the model.
        lower_program(graph.exported(), tmp_path, input_names, output_names, external_data=large, opset=opset)
        if check:
            check_parity(graph, tmp_path, graph.example_inputs, parity_tolerance(graph))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(directory, name if name != os.path.basename(tmp_path)
                                                             else os.path.basename(path)))
    return path


def lower_program(program, path: str, input_names: list[str], output_names: list[str], *,
                  external_data: bool = False, opset: int | None = None, metadata: dict | None = None) -> None:
    """ExportedProgram -> ONNX file at `path` (prunus ops through `translation_table`), checked by
    `onnx.checker`; `metadata` goes into the model's metadata_props. Every failure is an ExportError."""
    import onnx

    try:
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                program, dynamo=True, input_names=input_names, custom_translation_table=translation_table(),
                output_names=output_names, opset_version=opset, verbose=False, external_data=external_data,
                optimize=True)
            for key, value in (metadata or {}).items():
                onnx_program.model.metadata_props[key] = value
            onnx_program.save(path, external_data=external_data)
    except Exception as e:  # noqa: BLE001 - every lowering failure becomes one typed error
        raise ExportError(f"ONNX lowering failed at {failed_op(e)}: {_first_line(e)}") from e
    try:
        onnx.checker.check_model(path, full_check=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"onnx.checker rejected the exported model: {e}") from e


def _first_line(e: Exception) -> str:
    """`Type: first line of the message` (at most 300 characters of it)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


class _quiet_exporter:
    """The dynamo exporter logs every skipped torchvision op and each step; keep the console clean."""

    def __enter__(self):
        self.loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration",
                                                          "onnxscript")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)


def ort_input(x: torch.Tensor):
    """A torch tensor as an onnxruntime input: a numpy array, or for bfloat16 (which numpy lacks; a kv_quant cache
    of an fp32 model keeps its scales in it) an OrtValue over the same bits."""
    import onnxruntime as ort
    from onnx import TensorProto

    x = x.detach().cpu().contiguous()
    if x.dtype == torch.bfloat16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(x.view(torch.int16).numpy().view(np.uint16),
                                                                TensorProto.BFLOAT16)
    return x.numpy()


def run_onnx(path: str, inputs: list[torch.Tensor], input_names: list[str]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return session.run(None, {n: ort_input(x) for n, x in zip(input_names, inputs)})


def parity_tolerance(graph) -> float:
    """1e-3 of the output scale; 1e-2 for a half-precision model that quantizes activations (w8a8): an activation
    rounds to the nearest of 255 steps, and where fp16 noise upstream (onnxruntime's and PyTorch's rounding
    orders differ) crosses a half step, that value moves by a whole step."""
    half = any(p.dtype in (torch.float16, torch.bfloat16) for p in graph.gm.parameters())
    quantizes_x = any(n.op == "call_function" and str(n.target).startswith("prunus.linear_w8a8")
                      for n in graph.graph.nodes)
    return 1e-2 if half and quantizes_x else 1e-3


def check_parity(graph, path: str, inputs: list[torch.Tensor], atol: float = 1e-3) -> float:
    """Largest |onnxruntime - PyTorch| over the outputs, relative to the output scale; raises ExportError."""
    names = [info.name for info in graph.inputs]
    try:
        got = run_onnx(path, inputs, names)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own errors (a missing kernel) become one typed error
        bf16 = any(p.dtype == torch.bfloat16 for p in graph.gm.parameters())
        raise ExportError(f"onnxruntime cannot run the exported model: {_first_line(e)}"
                          + (" (its CPU provider lacks bf16 kernels for many ops: export an fp32 or fp16 model, or "
                             "pass check=False to write it unchecked)" if bf16 else "")) from e
    return compare_outputs(graph.output_names(), got, graph.run_flat(list(inputs)), atol)


def compare_outputs(names: list[str], got: list[np.ndarray], want: list[torch.Tensor], atol: float = 1e-3,
                    where: str = "") -> float:
    """Largest |got - want| relative to each output's scale; an ExportError above `atol` or on a shape mismatch."""
    worst = 0.0
    for name, g, w in zip(names, got, want):
        w = w.detach().float().numpy()
        if g.shape != w.shape:
            raise ExportError(f"{where}output '{name}' has shape {g.shape} in onnxruntime but {w.shape} in PyTorch")
        err = float(np.abs(g.astype(np.float64) - w).max()) if w.size else 0.0
        worst = max(worst, err / max(1.0, float(np.abs(w).max())))
    if worst > atol:
        raise ExportError(f"{where}onnxruntime output differs from PyTorch by {worst:.3g} (relative), above {atol}")
    return worst
