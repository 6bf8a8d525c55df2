"""The `prunus::fused` custom op and the kernel cache behind it.

A fused region becomes `torch.ops.prunus.fused(inputs, key)`: `key` names a generated module (emit.py)
registered here from its source. The op runs the module's Triton kernel on CUDA tensors, and on CPU
tensors under `TRITON_INTERPRET=1`; elsewhere it runs the module's `reference` (the region's original
ATen ops), so a fused graph runs anywhere. Its fake implementation is the reference on fake tensors, so
shapes stay symbolic and the graph still exports. Sources are written once to a cache folder keyed by the
source hash (Triton reads a kernel's source from its file) and imported from there; artifacts carry them in
`kernels/<key>.py` and `load_kernels` registers them again.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from typing import List

import torch
import torch.fx

from prunus.errors import ArtifactError

_KERNELS: dict[str, "Kernel"] = {}
KERNELS_DIR = "kernels"


def cache_dir() -> str:
    root = os.environ.get("PRUNUS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prunus")
    return os.path.join(root, "kernels")


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Opt-in (PRUNUS_FUSE_TUNE=1): on CUDA the first launch of a kernel at a new size bucket times a few launch
# shapes (rows per program, warps) around the default and keeps the fastest. Measured on an H100
# (`PRUNUS_FUSE_TUNE=1 python benchmarks/fuse_gpu.py`, BENCHMARKS.md) it does not pay: the patterns where the
# default trails Inductor (RoPE and SwiGLU prefill) stay behind, and replay noise can pick a slower shape
# (prefill layernorm 1.30x compile tuned, 1.45x not). Off by default.
TUNE = os.environ.get("PRUNUS_FUSE_TUNE", "0") == "1"


# rows wider than a program (SwiGLU and GELU over the MLP width): columns and warps a program, measured on an
# H100 (`python benchmarks/fuse_gpu.py --wide-shapes`, BENCHMARKS.md "Program shapes of the generated kernels
# over wide rows"): 8 elements a thread (one 16-byte load of bf16) on 4 warps. With 4 elements a thread GELU
# prefill ran 6-8% slower; with 2048 columns a program decode's single row (7 programs) ran 20-35% slower
WIDE_BLOCK, WIDE_WARPS = 1024, 4
MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2


def _warps(elements: int) -> int:
    return 4 if elements <= 2048 else (8 if elements <= 8192 else 16)


def launch_shape(reduction: bool, span: int, rows: int, flat: bool) -> tuple[int, int, int]:
    """(columns, rows, warps) a program of a generated kernel covers by default, for rows of `span` columns.

    A row reduction takes the whole row. Elementwise kernels take up to WIDE_BLOCK columns, and narrower rows
    several a program (2048 elements); rows wider than that run one a program in row-major program order
    (flat modules, see `emit.PROGRAM`)."""
    if reduction:
        block = _next_pow2(span)
    else:
        block = min(_next_pow2(span), WIDE_BLOCK if flat else 1024)
    if flat and span > block:
        rb = 1
    else:
        rb = min(_next_pow2(rows), max(1, 2048 // block))
    return block, rb, WIDE_WARPS if flat and span > block else _warps(block * rb)


def candidates(rb: int, warps: int, block: int, rows: int) -> list[tuple[int, int]]:
    """Launch shapes to try: the default (rb rows per program on `warps` warps, from `launch_shape`), half and
    twice the rows, and half and twice the warps; rows per program stay within the rows and a 16K-element tile."""
    default = (rb, warps)
    out = [default]
    for r in (rb // 2, rb * 2):
        if 1 <= r <= _next_pow2(rows) and r * block <= 16384:
            out.append((r, _warps(block * r)))
    for w in (default[1] // 2, default[1] * 2):
        if 1 <= w <= 16:
            out.append((rb, w))
    return list(dict.fromkeys(out))


def _fastest(run, shapes: list[tuple[int, int]], reps: int = 20) -> tuple[int, int]:
    """The shape whose launches run fastest, timed as CUDA-graph replays (no launch overhead in the figure)."""
    times = []
    for shape in shapes:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run(*shape)  # compiles
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                run(*shape)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        del graph
    best = min(range(len(shapes)), key=times.__getitem__)
    return shapes[best] if times[best] < 0.97 * times[0] else shapes[0]  # a clear win only: timing noise stays put


def _spans_2_31(inputs: list, outs: list) -> bool:
    """Whether some tensor's largest element offset (sum (size - 1) * stride) reaches 2^30, half the int32 range
    (the other half is margin for masked lanes past the last row): the kernel then indexes in 64 bits."""
    def last(t):
        return sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s)
    return max((last(t) for t in [*inputs, *outs] if t.dim()), default=0) >= 2**30


class Kernel:
    """One generated module: its source, its Triton kernel and its reference, loaded on first use."""

    def __init__(self, key: str, source: str):
        self.key, self.source = key, source
        self._module = None
        self._best: dict = {}  # (rows bucket, block, column blocks) -> (rows per program, warps), tuned on CUDA

    @property
    def module(self):
        if self._module is None:
            folder = cache_dir()
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{self.key}.py")
            if not os.path.exists(path) or open(path).read() != self.source:
                fd, tmp = tempfile.mkstemp(dir=folder, suffix=".py")
                with os.fdopen(fd, "w") as f:
                    f.write(self.source)
                os.replace(tmp, path)
            name = f"prunus_kernel_{self.key}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            self._module = module
        return self._module

    @property
    def meta(self) -> dict:
        return self.module.META

    def reference(self, inputs: list) -> list:
        return list(self.module.reference(*inputs))

    def __call__(self, inputs: list) -> list:
        on_gpu = bool(inputs) and inputs[0].is_cuda
        if on_gpu or (os.environ.get("TRITON_INTERPRET") == "1" and all(t.device.type == "cpu" for t in inputs)):
            return self.launch(inputs)
        return self.reference(inputs)

    def parts(self) -> list[dict]:
        meta = self.meta
        if "parts" in meta:
            return meta["parts"]
        # a module generated before groups existed: one part over all the inputs
        return [{**meta, "inputs": list(range(meta["inputs"]))}]

    def launch(self, inputs: list) -> list:
        parts = self.parts()
        device = inputs[0].device
        args, outs, blocks, spans = [], [], [], []
        for part in parts:
            tensors = [inputs[i] for i in part["inputs"]]
            rank = part["rank"]
            rows_shape = [1] * rank
            for t in tensors:
                lead = t.shape[:-1] if t.dim() else ()
                for j, size in enumerate(reversed(lead)):
                    if size != 1:
                        rows_shape[rank - 1 - j] = size
            for t in tensors:
                lead = t.shape[:-1] if t.dim() else ()
                offset = rank - len(lead)
                strides = [0 if d < offset or lead[d - offset] == 1 else t.stride(d - offset) for d in range(rank)]
                args += [t, *strides, t.stride(-1) if t.dim() else 0, t.shape[-1] if t.dim() else 1]

            def resolve(w, tensors=tensors):
                return w if isinstance(w, int) else tensors[int(w.removeprefix("in"))].shape[-1]

            mine = [torch.empty((*rows_shape, resolve(o["width"])), dtype=getattr(torch, o["dtype"]), device=device)
                    for o in part["outputs"]]
            outs += mine
            rows = 1
            for s in rows_shape:
                rows *= s
            args += mine + rows_shape + [rows]
            blocks.append(rows)
            spans.append(max(resolve(w) for w in part["span"]))
        span = max(spans)
        if max(blocks) == 0 or span == 0:
            return outs
        flat = bool(self.meta.get("flat"))
        block, rb, warps = launch_shape(any(p["reduction"] for p in parts), span, max(blocks), flat)
        col_blocks = -(-span // block)
        wide = {"WIDE": _spans_2_31(inputs, outs)} if self.meta.get("wide") else {}

        def run(rb: int, warps: int):
            # enable_fp_fusion=False: no FMA contraction across the region's ops, each rounds as eager's kernels do
            # (bf16 products and sums stay mul.rn / add.rn: an fma would skip the product's rounding)
            starts, total = [], 0
            for rows in blocks:  # each part's programs follow the previous part's
                starts.append(total)
                total += -(-rows // rb)
            if flat:  # column blocks fastest, then row blocks over axes 1 and 2
                slices = -(-total // MAX_GRID_Y)
                grid = (col_blocks, -(-total // slices), slices)
                self.module.kernel[grid](*args, *starts[1:], RB=rb, BLOCK=block, num_warps=warps,
                                         enable_fp_fusion=False, **wide)
            else:
                self.module.kernel[(total, col_blocks)](*args, *starts[1:], RB=rb, BLOCK=block, num_warps=warps,
                                                        enable_fp_fusion=False, **wide)

        choice = (rb, warps)
        if device.type == "cuda" and TUNE:
            shape = (_next_pow2(max(blocks)), block, col_blocks)
            best = self._best.get(shape)
            if best is None and not torch.cuda.is_current_stream_capturing():
                best = self._best[shape] = _fastest(run, candidates(rb, warps, block, max(blocks)))
            choice = best or choice
        run(*choice)
        return outs


def register_kernel(key: str, source: str) -> Kernel:
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _KERNELS[key] = Kernel(key, source)
    return kernel


def get_kernel(key: str) -> Kernel:
    kernel = _KERNELS.get(key)
    if kernel is None:
        raise ArtifactError(f"fused kernel {key} is not registered: load the artifact that holds kernels/{key}.py")
    return kernel


@torch.library.custom_op("prunus::fused", mutates_args=())
def fused(inputs: List[torch.Tensor], key: str) -> List[torch.Tensor]:
    """The generated kernel `key` over `inputs` (Triton on CUDA or the interpreter, its reference elsewhere)."""
    return get_kernel(key)(list(inputs))


@fused.register_fake
def _(inputs, key):
    return get_kernel(key).reference(list(inputs))


# ---- graphs that hold fused calls -------------------------------------------------------------------


def fused_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.prunus.fused.default]


def kernels_of(gm: torch.fx.GraphModule) -> dict[str, str]:
    """key -> source of every kernel the graph calls."""
    return {n.args[1]: get_kernel(n.args[1]).source for n in fused_nodes(gm)}


def save_kernels(gm: torch.fx.GraphModule, directory: str) -> list[str]:
    """Write `kernels/<key>.py` for every kernel the graph calls; returns the keys written."""
    kernels = kernels_of(gm)
    if kernels:
        os.makedirs(os.path.join(directory, KERNELS_DIR), exist_ok=True)
        for key, source in kernels.items():
            with open(os.path.join(directory, KERNELS_DIR, f"{key}.py"), "w") as f:
                f.write(source)
    return sorted(kernels)


def load_kernels(directory: str) -> list[str]:
    """Register every `kernels/<key>.py` of an artifact directory; returns the keys."""
    folder = os.path.join(directory, KERNELS_DIR)
    if not os.path.isdir(folder):
        return []
    keys = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                register_kernel(name.removesuffix(".py"), f.read())
            keys.append(name.removesuffix(".py"))
    return keys


def inline_fused(graph):
    """A copy of `graph` with every fused call replaced by its region's original ops (for ONNX export).

    The copy shares parameters with `graph`; a graph without fused calls is returned as it is.
    """
    from prunus.ir.graph import Graph

    if not fused_nodes(graph.gm):
        return graph
    new = torch.fx.Graph()
    env: dict = {}
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.prunus.fused.default:
            traced = torch.fx.symbolic_trace(get_kernel(node.args[1]).module.reference)
            sub_env = {}
            placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
            for ph, inp in zip(placeholders, node.args[0]):
                sub_env[ph] = env[inp]
            for sub in traced.graph.nodes:
                if sub.op == "call_function":
                    sub_env[sub] = new.node_copy(sub, lambda a: sub_env[a])
                elif sub.op == "output":
                    env[node] = [torch.fx.node.map_arg(o, lambda a: sub_env[a]) for o in sub.args[0]]
        elif node.op == "call_function" and isinstance(node.args[0], torch.fx.Node) \
                and node.args[0].target is torch.ops.prunus.fused.default:
            env[node] = env[node.args[0]][node.args[1]]  # getitem of a fused call
        else:
            env[node] = new.node_copy(node, lambda a: env[a])
    new._codegen = graph.graph._codegen
    gm = torch.fx.GraphModule(graph.gm, new)
    copy = Graph(gm, in_spec=graph.in_spec, out_spec=graph.out_spec, leaf_is_tensor=graph.leaf_is_tensor,
                 inputs=graph.inputs, example_inputs=graph.example_inputs, fake_mode=graph.fake_mode,
                 history=list(graph.history))
    copy.propagate_shapes("inline_fused")
    return copy
