"""`Graph`: a captured ATen-level GraphModule plus what passes share about it.

The GraphModule takes and returns flat tensors; `in_spec`/`out_spec` restore the structure the user's
model had (e.g. a Hugging Face `CausalLMOutputWithPast`). Parameters are module attributes, every node
carries `meta["val"]` (a fake tensor with symbolic batch/sequence sizes) and `meta["nn_module_stack"]`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx
from torch._dispatch.python import enable_python_dispatcher
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from prunus.errors import InputError, PassError


@dataclass
class InputInfo:
    """One flat tensor input: its name, rank, dtype and which dims are symbolic (dim -> name)."""

    name: str
    rank: int
    dtype: torch.dtype
    dynamic: dict = field(default_factory=dict)


class Graph:
    def __init__(self, gm: torch.fx.GraphModule, *, in_spec, out_spec, leaf_is_tensor: list[bool],
                 inputs: list[InputInfo], example_inputs: list[torch.Tensor], fake_mode=None,
                 history: list | None = None):
        self.gm = gm
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.leaf_is_tensor = leaf_is_tensor
        self.inputs = inputs
        self.example_inputs = example_inputs  # flat tensors of the capture, batch >= 2 where possible
        self.fake_mode = fake_mode
        self.history = history if history is not None else []
        self._analyses: dict = {}
        self._program = None  # the re-exported ExportedProgram, until the next edit
        self.kv: dict | None = None  # the KV-cache policy `kv_cache`/`kv_quant` chose (params), read by decoding

    # ---- running ---------------------------------------------------------------------------
    def flatten_inputs(self, args: tuple) -> list[torch.Tensor]:
        leaves, spec = pytree.tree_flatten(tuple(args))
        if spec != self.in_spec:
            raise InputError(f"inputs do not match the captured structure: expected {self.in_spec}, got {spec}")
        tensors = [x for x, is_t in zip(leaves, self.leaf_is_tensor) if is_t]
        for t, info in zip(tensors, self.inputs):
            if not isinstance(t, torch.Tensor):
                raise InputError(f"input '{info.name}' must be a tensor, got {type(t).__name__}")
            if t.dim() != info.rank:
                raise InputError(f"input '{info.name}' must have {info.rank} dims, got shape {tuple(t.shape)}")
            if t.dtype != info.dtype:
                raise InputError(f"input '{info.name}' must be {info.dtype}, got {t.dtype}")
        return tensors

    def run_flat(self, flat: list[torch.Tensor]) -> list:
        with torch.no_grad():
            out = self.gm(*flat)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def __call__(self, *args):
        flat_out = self.run_flat(self.flatten_inputs(args))
        return pytree.tree_unflatten(flat_out, self.out_spec) if self.out_spec is not None else tuple(flat_out)

    # ---- structure -------------------------------------------------------------------------
    @property
    def graph(self) -> torch.fx.Graph:
        return self.gm.graph

    def placeholders(self) -> list[torch.fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def output_node(self) -> torch.fx.Node:
        return next(n for n in reversed(self.graph.nodes) if n.op == "output")

    def output_names(self) -> list[str]:
        n_out = len(pytree.tree_leaves(self.output_node().args[0]))
        if self.out_spec is None:
            return [f"output_{i}" for i in range(n_out)]
        tree = pytree.tree_unflatten(list(range(n_out)), self.out_spec)
        names = []
        for path, _ in pytree.tree_flatten_with_path(tree)[0]:
            name = re.sub(r"[^A-Za-z0-9_]+", "_", pytree.keystr(path)).strip("_")
            names.append(name or f"output_{len(names)}")
        return names

    def num_parameters(self) -> int:
        """Model parameters, counting a quantized weight as the N x K values it stands for."""
        from prunus.ir.ops import quantized_linear_shape

        packed = 0
        for n in self.graph.nodes:
            shape = quantized_linear_shape(n)
            if shape is not None:
                packed += shape[0] * shape[1]
        return sum(p.numel() for p in self.gm.parameters()) + packed

    def weight_bytes(self) -> int:
        """Bytes of every parameter and buffer the graph reads (packed weights at their packed size); tied
        weights (one tensor under two names) count once."""
        seen, total = set(), 0
        for n in self.graph.nodes:
            if n.op == "get_attr":
                value = self.get_attr_value(n)
                if isinstance(value, torch.Tensor):
                    key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
                    if key not in seen:
                        seen.add(key)
                        total += value.numel() * value.element_size()
        return total

    def param_table(self) -> list[tuple[str, tuple, torch.dtype, int]]:
        return [(n, tuple(p.shape), p.dtype, p.numel()) for n, p in self.gm.named_parameters()]

    def is_parameter(self, node: torch.fx.Node) -> bool:
        """Whether a get_attr node reads an nn.Parameter (not a buffer or constant)."""
        if node.op != "get_attr":
            return False
        owner, _, attr = node.target.rpartition(".")
        mod = self.gm.get_submodule(owner) if owner else self.gm
        return attr in mod._parameters

    def get_attr_value(self, node: torch.fx.Node):
        obj = self.gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj

    def symbol_names(self) -> dict:
        """sympy symbol -> readable name ("batch", "seq", ...), from the inputs' dynamic dims."""
        names = {}
        for node, info in zip(self.placeholders(), self.inputs):
            val = node.meta.get("val")
            for dim, name in info.dynamic.items():
                size = val.shape[dim]
                if isinstance(size, torch.SymInt):
                    expr = size.node.expr
                    if expr.is_Symbol and expr not in names:
                        names[expr] = name
        return names

    def exported(self):
        """This graph as an ExportedProgram (for saving and ONNX), exported once per version of the graph."""
        if self._program is None:
            from prunus.ir.capture import reexport

            self._program = reexport(self)
        return self._program

    def shape_str(self, val) -> str:
        from prunus.ir.printer import format_val

        return format_val(val, self.symbol_names())

    # ---- analyses --------------------------------------------------------------------------
    def analysis(self, name: str):
        """The named analysis of this graph, computed once and cached until invalidated."""
        if name not in self._analyses:
            from prunus.ir.analyses import ANALYSES

            if name not in ANALYSES:
                raise KeyError(f"unknown analysis {name!r}; known: {', '.join(sorted(ANALYSES))}")
            self._analyses[name] = ANALYSES[name](self)
        return self._analyses[name]

    def cached(self, key, make):
        """`make()` computed once and kept with the analyses until the graph next changes (e.g. KV graphs)."""
        if key not in self._analyses:
            self._analyses[key] = make()
        return self._analyses[key]

    def invalidate(self, preserve: tuple[str, ...] = ()) -> None:
        self._analyses = {k: v for k, v in self._analyses.items() if k in preserve}

    # ---- edits -----------------------------------------------------------------------------
    def recompile(self, pass_name: str = "?") -> None:
        """After an edit: lint, drop unused attributes, recompile and re-propagate shapes."""
        try:
            self.graph.lint()
        except Exception as e:  # noqa: BLE001 - fx raises plain RuntimeError
            raise PassError(pass_name, f"left an ill-formed graph: {e}") from e
        self.drop_unreferenced()
        self._program = None
        self.gm.recompile()
        self.propagate_shapes(pass_name)

    def drop_unreferenced(self) -> None:
        """Delete parameters and buffers that no op reads any more (so replaced or pruned weights are freed)."""
        for n in list(self.graph.nodes):
            if n.op == "get_attr" and not n.users:
                self.graph.erase_node(n)
        used = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        for name, _ in list(self.gm.named_parameters(remove_duplicate=False)) + list(
                self.gm.named_buffers(remove_duplicate=False)):
            if name not in used:
                owner, _, attr = name.rpartition(".")
                mod = self.gm.get_submodule(owner) if owner else self.gm
                mod._parameters.pop(attr, None)
                mod._buffers.pop(attr, None)
        self.gm.delete_all_unused_submodules()

    def add_constant(self, tensor: torch.Tensor, prefix: str = "_const") -> str:
        """Register `tensor` as a buffer under a fresh top-level name and return the name."""
        prefix = re.sub(r"\W", "_", prefix)
        if not prefix.isidentifier():  # a leading digit: nn.Sequential's module paths ("0", "1.fc")
            prefix = "_" + prefix
        name, i = prefix, 0
        while hasattr(self.gm, name):
            name, i = f"{prefix}{i}", i + 1
        self.gm.register_buffer(name, tensor)
        return name

    def propagate_shapes(self, pass_name: str = "?") -> None:
        """Re-run fake-tensor propagation with the symbolic inputs, so a wrong shape fails at its pass."""
        if self.fake_mode is None:
            return
        inputs = [n.meta["val"] for n in self.placeholders()]
        try:
            # The Python dispatcher, as export itself uses: without it, composite ops on CUDA (linear, matmul,
            # scaled_dot_product_attention) read fake sizes as ints and pin the sequence length to the example's.
            with self.fake_mode, enable_python_dispatcher():
                FakeTensorProp(self.gm, self.fake_mode).propagate_dont_convert_inputs(*inputs)
        except Exception as e:  # noqa: BLE001 - report the node where propagation broke
            node = getattr(e, "node", None)
            raise PassError(pass_name, f"shape propagation failed after the pass: {type(e).__name__}: {e}",
                            node=getattr(node, "name", None)) from e


def module_path(node: torch.fx.Node) -> str:
    """The innermost module a node came from, as a dotted path ('' for the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        if not path.startswith("_empty_nn_module_stack") and not path.startswith("L["):
            return path
    return ""


def common_module_path(nodes) -> str:
    """The deepest module holding all `nodes` that came from a module ('model.layers.0.mlp' for gate, up, down)."""
    paths = [module_path(n).split(".") for n in nodes if module_path(n)]
    if not paths:
        return ""
    common = paths[0]
    for parts in paths[1:]:
        while common and parts[:len(common)] != common:
            common = common[:-1]
    return ".".join(common)


_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(path: str) -> int | None:
    """The first numeric component of a module path: 'model.layers.3.mlp' -> 3."""
    m = _INDEX.search(path)
    return int(m.group(1)) if m else None
