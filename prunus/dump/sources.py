"""Read what `prunus dump` shows: an artifact directory, a `.pt2` program or an `.onnx` file, as IR views.

An artifact carries one view per pipeline step (`ir/NN_label.json`, written after capture and after every
pass) and the pass report; a `.pt2` or `.onnx` file carries one view of its graph.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from prunus.errors import ArtifactError


@dataclass
class Source:
    """A dumped path: its views (label, view) in pipeline order, and what the artifact says about them."""

    path: str
    kind: str  # "artifact", "pt2" or "onnx"
    snapshots: list[tuple[str, dict]]
    pipeline: str | None = None
    report: list[dict] = field(default_factory=list)
    flops_at: str = "example shape"  # the input sizes node FLOPs were counted at
    kernels: list[tuple[str, str]] = field(default_factory=list)  # (file name, source) of generated kernels

    def select(self, after: str | None = None) -> tuple[str, dict]:
        """The view after pass `after` (a pass name such as 'dce' or a label such as '02_fold_constants').

        Without `after`, the last view: the graph as saved.
        """
        if after is None:
            return self.snapshots[-1]
        if self.kind != "artifact":
            raise ArtifactError(f"--after needs an artifact directory with IR snapshots; {self.path} is a "
                                f".{self.kind} file with one graph")
        labels = [label for label, _ in self.snapshots]
        by_label = dict(self.snapshots)
        if after in by_label:
            return after, by_label[after]
        matches = [label for label in labels if label.split("_", 1)[-1] == after]
        if len(matches) == 1:
            return matches[0], by_label[matches[0]]
        if matches:
            raise ArtifactError(f"pass '{after}' ran {len(matches)} times in {self.path}; name one snapshot: "
                                f"{', '.join(matches)}")
        raise ArtifactError(f"no snapshot after pass '{after}' in {self.path}; available: {', '.join(labels)}")


def open_source(path: str) -> Source:
    """Read `path` by its kind; anything unreadable is an `ArtifactError` that says what was expected."""
    if os.path.isdir(path):
        return _artifact(path)
    if not os.path.isfile(path):
        raise ArtifactError(f"{path} does not exist; expected an artifact directory, a .pt2 or an .onnx file")
    if path.endswith(".onnx"):
        from prunus.dump.onnx_view import onnx_view

        view, flops_at = onnx_view(path)
        return Source(path, "onnx", [(os.path.basename(path), view)], flops_at=flops_at)
    if path.endswith(".pt2"):
        view, flops_at = _program_view(path)
        return Source(path, "pt2", [(os.path.basename(path), view)], flops_at=flops_at)
    raise ArtifactError(f"{path}: unknown file type; expected an artifact directory, a .pt2 or an .onnx file")


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is unreadable: {e}") from e


def _artifact(path: str) -> Source:
    manifest_path = os.path.join(path, "pipeline.json")
    if not os.path.isfile(manifest_path):
        raise ArtifactError(f"{path} lacks pipeline.json: not a prunus artifact directory")
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path} is not a prunus manifest (expected a JSON object)")
    ir_dir = os.path.join(path, "ir")
    snapshots = []
    if os.path.isdir(ir_dir):
        for name in sorted(os.listdir(ir_dir)):
            if name.endswith(".json"):
                snapshots.append((name.removesuffix(".json"), _check_view(_read_json(os.path.join(ir_dir, name)),
                                                                          os.path.join(ir_dir, name))))
    if not snapshots:  # saved without snapshots: the program is the one view there is
        view, _ = _program_view(os.path.join(path, "program.pt2"))
        view["history"] = manifest.get("passes", [])
        snapshots = [("final", view)]
    return Source(path, "artifact", snapshots, pipeline=manifest.get("pipeline"), report=manifest.get("report", []),
                  flops_at=_example_sizes(manifest), kernels=_kernel_sources(path))


def _kernel_sources(path: str) -> list[tuple[str, str]]:
    """The generated Triton modules an artifact carries in kernels/ (written by the fuse pass)."""
    folder = os.path.join(path, "kernels")
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                out.append((name, f.read()))
    return out


def _check_view(view, path: str) -> dict:
    if not isinstance(view, dict) or not {"nodes", "parameters", "num_parameters"} <= set(view):
        raise ArtifactError(f"{path} is not an IR snapshot (expected the dict of prunus.ir.printer.to_dict)")
    return view


def _example_sizes(manifest: dict) -> str:
    sizes = {}
    for info, shape in zip(manifest.get("inputs", []), manifest.get("example_shapes", [])):
        for dim, name in info.get("dynamic", {}).items():
            sizes.setdefault(name, shape[int(dim)])
    return ", ".join(f"{k}={v}" for k, v in sizes.items()) or "example shape"


# Names for the symbolic dims of a bare program's inputs, as capture names them (batch first, then sequence).
_DIM_NAMES = ("batch", "seq")


def _program_view(path: str) -> tuple[dict, str]:
    """The view of a torch.export program, with its symbolic input dims named batch, seq, dim2, ..."""
    import torch

    from prunus.ir.capture import graph_from_exported
    from prunus.ir.printer import to_dict

    if not os.path.isfile(path):
        raise ArtifactError(f"{path} does not exist")
    try:
        ep = torch.export.load(path)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a file that is not a program
        raise ArtifactError(f"cannot read {path} as a torch.export program: {type(e).__name__}: {e}") from e
    user = set(ep.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
    tensors = [v for v in vals if isinstance(v, torch.Tensor)]
    dynamic = [{d: _DIM_NAMES[d] if d < len(_DIM_NAMES) else f"dim{d}" for d, s in enumerate(v.shape)
                if isinstance(s, torch.SymInt)} for v in tensors]
    sizes = {}
    for v, dims in zip(tensors, dynamic):
        for d, name in dims.items():
            sizes.setdefault(name, v.shape[d].node.hint)
    graph = graph_from_exported(ep, in_spec=ep.call_spec.in_spec, leaf_is_tensor=[isinstance(v, torch.Tensor)
                                                                                   for v in vals],
                                dynamic=dynamic, example_inputs=[], out_spec=None)
    return to_dict(graph), ", ".join(f"{k}={v}" for k, v in sizes.items()) or "example shape"
