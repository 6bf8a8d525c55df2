"""`prunus.optimize`, `OptimizedModel`, `prunus.load` and `prunus.report_table`."""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile

import torch
from torch.utils import _pytree as pytree

import prunus
from prunus.codegen.onnx import export_kv_onnx, export_onnx
from prunus.codegen.triton import inline_fused, load_kernels, save_kernels
from prunus.errors import ArtifactError, CaptureError, SpecError
from prunus.ir.capture import capture, graph_from_exported
from prunus.ir.graph import Graph
from prunus.passes import PassManager, build_pipeline

FORMAT_VERSION = 1


def _calibration_inputs(calibration, graph: Graph) -> list | None:
    if calibration is None:
        return None
    samples = getattr(calibration, "samples", calibration)
    if not isinstance(samples, (list, tuple)):
        raise SpecError("calibration must be a list of input tuples or a prunus.data.Calibration")
    out = []
    for i, sample in enumerate(samples):
        sample = (sample,) if isinstance(sample, torch.Tensor) else tuple(sample)
        try:
            out.append(graph.flatten_inputs(sample))
        except prunus.PrunusError as e:
            raise SpecError(f"calibration sample {i}: {e}") from None
    return out


class OptimizedModel:
    """A captured and optimized model: call it like the original, inspect `.report` and `.graph`."""

    def __init__(self, graph: Graph, report: list, pipeline: str, snapshots: list | None = None):
        self.graph = graph
        self.report = report
        self.pipeline = pipeline
        self.snapshots = snapshots or []  # (label, IR dict) after capture and after every pass
        self.source: str | None = None  # the zoo name or directory the model came from, when known

    def __call__(self, *args, **kwargs):
        if kwargs:
            raise prunus.InputError(f"keyword inputs {sorted(kwargs)} were not captured; pass inputs positionally, "
                                    "as in example_inputs")
        return self.graph(*args)

    def num_parameters(self) -> int:
        return self.graph.num_parameters()

    def __repr__(self) -> str:
        return f"OptimizedModel(pipeline={self.pipeline!r}, parameters={self.num_parameters():,})"

    # ---- artifact ----------------------------------------------------------------------------
    def save(self, directory: str, *, onnx: bool = False) -> str:
        """Write the artifact directory atomically: program.pt2, pipeline.json, optionally model.onnx (and, for a
        model through `kv_cache`, prefill.onnx and decode.onnx, which `prunus.codegen.onnx.OrtKVDecoder` runs)."""
        directory = os.path.abspath(directory)
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.tmp-")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; an artifact is an ordinary directory
        try:
            torch.export.save(self.graph.exported(), os.path.join(tmp, "program.pt2"))
            save_kernels(self.graph.gm, tmp)  # kernels/<key>.py for every fused call
            if onnx:
                export_onnx(inline_fused(self.graph), os.path.join(tmp, "model.onnx"))
                if self.graph.kv is not None:
                    export_kv_onnx(self.graph, tmp)
            if self.snapshots:
                os.makedirs(os.path.join(tmp, "ir"))
                for label, snapshot in self.snapshots:
                    with open(os.path.join(tmp, "ir", f"{label}.json"), "w") as f:
                        json.dump(snapshot, f, default=str)
            with open(os.path.join(tmp, "pipeline.json"), "w") as f:
                json.dump(self._manifest(), f, indent=1, default=str)
            if os.path.exists(directory):
                old = directory + ".old-prunus"
                os.replace(directory, old)
                os.replace(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    def _manifest(self) -> dict:
        g = self.graph
        try:
            out_spec = pytree.treespec_dumps(g.out_spec) if g.out_spec is not None else None
        except Exception:  # noqa: BLE001 - an unserializable output type reloads as a flat tuple
            out_spec = None
        return {
            "format_version": FORMAT_VERSION,
            "pipeline": self.pipeline,
            "source": self.source,
            "passes": g.history,
            "report": [r.to_dict() for r in self.report],
            "in_spec": pytree.treespec_dumps(g.in_spec),
            "out_spec": out_spec,
            "leaf_is_tensor": g.leaf_is_tensor,
            "inputs": [{"name": i.name, "rank": i.rank, "dtype": str(i.dtype).removeprefix("torch."),
                        "dynamic": {str(k): v for k, v in i.dynamic.items()}} for i in g.inputs],
            "example_shapes": [list(x.shape) for x in g.example_inputs],
            "kv": g.kv,  # the KV policy decoding applies (kv_cache / kv_quant), None without one
            "versions": {"prunus": prunus.__version__, "torch": torch.__version__},
        }

    def export_onnx(self, path: str, *, check: bool = True) -> str:
        """Export to ONNX with dynamic batch/sequence; onnxruntime's outputs are checked against PyTorch.

        Fused kernels are exported as the ops they were generated from."""
        return export_onnx(inline_fused(self.graph), path, check=check)


def optimize(model, passes="dce", example_inputs=None, calibration=None, verify: bool = True,
             dump_dir: str | None = None, progress=None) -> OptimizedModel:
    """Capture `model` at `example_inputs`, run the pipeline `passes` with verification, return the result."""
    pipeline = build_pipeline(passes)
    if example_inputs is None:
        raise CaptureError("example_inputs is required: a tuple of positional inputs, as for model(*example_inputs)")
    graph = capture(model, example_inputs)
    manager = PassManager(pipeline, verify=verify, dump_dir=dump_dir,
                          calibration=_calibration_inputs(calibration, graph), progress=progress)
    report = manager.run(graph)
    return OptimizedModel(graph, report, ", ".join(p.spec() for p in pipeline), manager.snapshots)


def load(path: str) -> OptimizedModel:
    """Load an artifact directory written by `OptimizedModel.save`."""
    manifest_path = os.path.join(path, "pipeline.json")
    program_path = os.path.join(path, "program.pt2")
    if not os.path.isdir(path):
        raise ArtifactError(f"{path} is not an artifact directory")
    if not os.path.exists(manifest_path) or not os.path.exists(program_path):
        raise ArtifactError(f"{path} lacks pipeline.json or program.pt2: not a prunus artifact")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{manifest_path} is unreadable: {e}") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"artifact format {version} is not supported by this prunus (expects {FORMAT_VERSION})")
    try:
        load_kernels(path)  # the fused calls in the program name these generated kernels
        ep = torch.export.load(program_path)
        in_spec = pytree.treespec_loads(manifest["in_spec"])
        out_spec = pytree.treespec_loads(manifest["out_spec"]) if manifest.get("out_spec") else None
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"cannot read {program_path}: {type(e).__name__}: {e}") from e
    dims = [{int(k): v for k, v in i["dynamic"].items()} for i in manifest["inputs"]]
    examples = [torch.zeros(shape, dtype=getattr(torch, i["dtype"]))
                for shape, i in zip(manifest["example_shapes"], manifest["inputs"])]
    graph = graph_from_exported(ep, in_spec=in_spec, leaf_is_tensor=manifest["leaf_is_tensor"], dynamic=dims,
                                example_inputs=examples, out_spec=out_spec, history=manifest.get("passes", []))
    graph.kv = manifest.get("kv")  # absent in artifacts written before KV policies were saved
    from prunus.passes.manager import PassRecord

    report = [PassRecord(**r) for r in manifest.get("report", [])]
    snapshots = []
    ir_dir = os.path.join(path, "ir")
    if os.path.isdir(ir_dir):
        for name in sorted(os.listdir(ir_dir)):
            with open(os.path.join(ir_dir, name)) as f:
                snapshots.append((name.removesuffix(".json"), json.load(f)))
    opt = OptimizedModel(graph, report, manifest.get("pipeline", ""), snapshots)
    opt.source = manifest.get("source")
    return opt


def report_table(opt: OptimizedModel, *, title: str | None = None):
    """The report as a `rich` table: `print()` renders it as text, a rich console renders it in colour."""
    from rich.console import Console
    from rich.text import Text
    from rich.table import Table

    class ReportTable(Table):
        def __str__(self) -> str:
            console = Console(width=160, record=True, file=io.StringIO())
            console.print(self)
            return console.export_text().rstrip("\n")

    table = ReportTable(title=Text(title or f"prunus: {opt.pipeline}"))  # quantize(exclude=[lm_head]) is text
    numeric = ("seconds", "params", "weights MB", "GFLOPs/token")
    for col in ("pass", "kind", *numeric, "verification", "notes"):
        table.add_column(col, justify="right" if col in numeric else "left")
    for r in opt.report:
        ver = ", ".join(f"{k}={v:.3g}" for k, v in r.verification.items() if isinstance(v, (int, float)))
        table.add_row(Text(r.spec), r.kind, f"{r.seconds:.2f}", _delta(r.params_before, r.params_after, "{:,}"),
                      _delta(r.weight_bytes_before / 1e6, r.weight_bytes_after / 1e6, "{:.2f}"),
                      _delta(r.flops_before / 1e9, r.flops_after / 1e9, "{:.4f}"), ver,
                      Text("; ".join(r.notes)))  # pass text such as schedule=[[layer, keep]] is not markup
    return table


def _delta(before, after, fmt: str) -> str:
    return fmt.format(after) if before == after else f"{fmt.format(before)} -> {fmt.format(after)}"
