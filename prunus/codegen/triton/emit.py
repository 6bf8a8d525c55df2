"""Emit one Python module per fused region: a Triton kernel generated from its ops, and the ops themselves.

The kernel follows one row template: program (block of RB rows, column block) decomposes each row into
the leading indices, computes each input's row offset from strides (0 where the input broadcasts), and evaluates the
region's outputs over `cols`. A value is generated as an expression of a column index, so slice and cat
along the last dim become index shifts and selects (RoPE's rotate_half is then two shifted loads), and a
reduction over the row (mean, sum, amax, and inside layer_norm / rms_norm / softmax) becomes a masked
`tl.sum` / `tl.max` of the whole row: a region with one needs a single column block covering the row.
Everything is computed in float32; a value whose op produced bf16/fp16 is rounded to it, as eager does.

The module also holds `reference(...)`, the region's ATen ops as Python: it computes output shapes (the
custom op's fake implementation), runs where Triton cannot, and is what ONNX export inlines back.
"""
from __future__ import annotations

import hashlib

import torch
import torch.fx

from prunus.codegen.triton import ops
from prunus.codegen.triton.partition import Region, classify


class Unsupported(Exception):
    """The region cannot be generated (e.g. a symbolic width no input carries); it stays unfused."""


def _op_name(target) -> str:
    return f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"


class _Emitter:
    def __init__(self, region: Region):
        self.region = region
        self.index = {n: k for k, n in enumerate(region.inputs)}
        self.lines: list[str] = []
        self.cache: dict = {}
        self.reduced_widths: list = []
        self.count = 0

    # ---- widths ------------------------------------------------------------------------------
    def width(self, node) -> str:
        val = node.meta["val"]
        if val.dim() == 0:
            return "1"
        size = val.shape[-1]
        if isinstance(size, int):
            return str(size)
        for k, inp in enumerate(self.region.inputs):
            v = inp.meta["val"]
            if v.dim() and str(v.shape[-1]) == str(size):
                return f"in{k}_n"
        raise Unsupported(f"width {size} of {node.name} is carried by no input")

    def static_width(self, node) -> int:
        w = self.width(node)
        if not w.isdigit():
            raise Unsupported(f"{node.name} needs a static width, got {w}")
        return int(w)

    # ---- values ------------------------------------------------------------------------------
    def define(self, expr: str) -> str:
        name = f"v{self.count}"
        self.count += 1
        self.lines.append(f"{name} = {expr}")
        return name

    def operand(self, a, idx: str) -> str:
        if isinstance(a, torch.fx.Node):
            return self.value(a, idx)
        if isinstance(a, str):
            return a
        return ops._scalar(a)

    def value(self, node, idx: str) -> str:
        key = (node, idx)
        if key in self.cache:
            return self.cache[key]
        if node in self.index:
            expr = self.load(node, idx)
        else:
            expr = self.compute(node, idx)
            dtype = node.meta["val"].dtype
            if dtype != torch.float32 and not self.exact_in(node, dtype):
                expr = ops._round_to(expr, dtype)
        name = self.define(expr)
        self.cache[key] = name
        return name

    def exact_in(self, node, dtype) -> bool:
        """Whether `node` yields values of `dtype` already: neg, slice, cat and casts of such values."""
        if node.target not in ops.EXACT:
            return False
        return all(a.meta["val"].dtype == dtype or (a not in self.index and self.exact_in(a, dtype))
                   for a in node.all_input_nodes)

    def load(self, node, idx: str) -> str:
        k = self.index[node]
        val = node.meta["val"]
        if val.dim() == 0 or (isinstance(val.shape[-1], int) and val.shape[-1] == 1):
            return f"tl.load(in{k}_ptr + in{k}_off, mask=rmask, other=0.0).to(tl.float32)"
        cmask = f"(cols < in{k}_n)" if idx == "cols" else f"(({idx}) >= 0) & (({idx}) < in{k}_n)"
        return (f"tl.load(in{k}_ptr + in{k}_off + ({idx}) * in{k}_sn, mask=rmask & {cmask}, other=0.0)"
                ".to(tl.float32)")

    def row_reduce(self, combine: str, identity: str, expr_of_cols: str, width: str) -> str:
        """A per-row scalar: `combine` over the masked row (every column block covers the whole row)."""
        self.reduced_widths.append(width)
        return self.define(f"{combine}(tl.where(cols < {width}, {expr_of_cols}, {identity}), axis=1, keep_dims=True)")

    def compute(self, node, idx: str) -> str:
        t, args, kwargs = node.target, node.args, node.kwargs
        if t in ops.ELEMENTWISE:
            operands = [self.operand(a, idx) for a in args]
            extra = {k: v for k, v in kwargs.items()}
            return ops.ELEMENTWISE[t](*operands, **extra)
        if t in ops.CASTS:
            return self.value(args[0], idx)
        if t in ops.REDUCTIONS:
            combine, identity, finish = ops.REDUCTIONS[t]
            x = args[0]
            w = self.width(x)
            if w == "1":
                raise Unsupported(f"{node.name} reduces a width-1 value")
            return finish(self.row_reduce(combine, identity, self.value(x, "cols"), w), w)
        if t is torch.ops.aten.slice.Tensor:
            start = args[2] if len(args) > 2 else 0
            if start < 0:
                start += self.static_width(args[0])
            return self.value(args[0], idx if start == 0 else f"({idx}) + {start}")
        if t is torch.ops.aten.cat.default:
            parts, offset = args[0], 0
            exprs = []
            for p in parts:
                exprs.append((offset, self.value(p, idx if offset == 0 else f"({idx}) - {offset}")))
                offset += self.static_width(p)
            expr = exprs[-1][1]
            for (_, e), (nxt, _) in zip(reversed(exprs[:-1]), reversed(exprs[1:])):
                expr = f"tl.where(({idx}) < {nxt}, {e}, {expr})"
            return expr
        if t is torch.ops.aten.layer_norm.default:
            x, w = args[0], self.width(args[0])
            weight = args[2] if len(args) > 2 else None
            bias = args[3] if len(args) > 3 else None
            eps = args[4] if len(args) > 4 else 1e-5
            xc = self.value(x, "cols")
            mean = self.define(f"{self.row_reduce('tl.sum', '0.0', xc, w)} / {w}")
            d = self.define(f"{xc} - {mean}")
            var = self.define(f"{self.row_reduce('tl.sum', '0.0', f'{d} * {d}', w)} / {w}")
            rstd = self.define(f"tl.rsqrt({var} + {ops._scalar(eps)})")
            expr = f"(({self.value(x, idx)} - {mean}) * {rstd})"
            if weight is not None:
                expr = f"({expr} * {self.value(weight, idx)})"
            if bias is not None:
                expr = f"({expr} + {self.value(bias, idx)})"
            return expr
        if t is torch.ops.aten.rms_norm.default:
            x, w = args[0], self.width(args[0])
            weight = args[2] if len(args) > 2 else None
            eps = args[3] if len(args) > 3 and args[3] is not None else torch.finfo(x.meta["val"].dtype).eps
            xc = self.value(x, "cols")
            ms = self.define(f"{self.row_reduce('tl.sum', '0.0', f'{xc} * {xc}', w)} / {w}")
            rstd = self.define(f"tl.rsqrt({ms} + {ops._scalar(eps)})")
            expr = f"({self.value(x, idx)} * {rstd})"
            return f"({expr} * {self.value(weight, idx)})" if weight is not None else expr
        if t in (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default):
            x, w = args[0], self.width(args[0])
            xc = self.value(x, "cols")
            m = self.row_reduce("tl.max", "float('-inf')", xc, w)
            s = self.row_reduce("tl.sum", "0.0", f"tl.exp({xc} - {m})", w)
            return f"(tl.exp({self.value(x, idx)} - {m}) / {s})"
        raise Unsupported(f"no Triton expression for {t}")


def _py(a, names: dict) -> str:
    """A node argument as Python source inside `reference`."""
    if isinstance(a, torch.fx.Node):
        return names[a]
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_py(x, names) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner},)"
    if isinstance(a, torch.dtype):
        return str(a)
    if isinstance(a, float):
        return ops._scalar(a)
    if a is None or isinstance(a, (bool, int, str)):
        return repr(a)
    raise Unsupported(f"cannot write argument {a!r} as source")


def _reference_source(region: Region) -> str:
    names = {n: f"in{k}" for k, n in enumerate(region.inputs)}
    params = ", ".join(names[n] for n in region.inputs)
    lines = [f"def reference({params}):", '    """The region\'s original ATen ops (shapes, fallback, ONNX)."""']
    # names by position: equal regions give equal sources (one kernel); a group's parts one after the other
    nodes = [n for part in (region.parts or [region]) for n in part.nodes]
    for i, n in enumerate(nodes):
        names[n] = f"t{i}"
        args = [_py(a, names) for a in n.args] + [f"{k}={_py(v, names)}" for k, v in n.kwargs.items()]
        lines.append(f"    {names[n]} = {_op_name(n.target)}({', '.join(args)})")
    views = ops.CASTS - {torch.ops.aten._to_copy.default} | {torch.ops.aten.slice.Tensor}
    outs = [f"torch.ops.aten.clone.default({names[o]})" if o.target in views else names[o] for o in region.outputs]
    lines.append(f"    return [{', '.join(outs)}]")
    return "\n".join(lines)


def _width_meta(w: str):
    return int(w) if w.isdigit() else w.removesuffix("_n")


def _part(region: Region, inputs: list) -> tuple[list, list, dict]:
    """(params, body, meta) of one region's row template; `inputs` are the kernel's inputs, which the region's
    inputs index into (a group's parts share them). The body starts from `pid`, its block of rows, and
    `cb`, its block of columns (see PROGRAM)."""
    e = _Emitter(region)
    rank = len(region.rows)
    out_widths = [e.width(o) for o in region.outputs]
    stores = []
    for j, (o, w) in enumerate(zip(region.outputs, out_widths)):
        v = e.value(o, "cols")
        dt = ops.TL_DTYPE[o.meta["val"].dtype]
        if w == "1":
            stores.append(f"tl.store(out{j}_ptr + row, {v}.to({dt}), mask=rmask)")
        else:
            stores.append(f"tl.store(out{j}_ptr + row * {w} + cols, {v}.to({dt}), mask=rmask & (cols < {w}))")
    params = []
    for k in range(len(region.inputs)):
        params += [f"in{k}_ptr"] + [f"in{k}_s{d}" for d in range(rank)] + [f"in{k}_sn", f"in{k}_n"]
    params += [f"out{j}_ptr" for j in range(len(region.outputs))]
    params += [f"L{d}" for d in range(rank)] + ["ROWS"]
    # 32-bit row and offset arithmetic unless a tensor's offsets reach 2^30 (WIDE): a 64-bit division is a long
    # software sequence, and a rank-3 row index (RoPE's batch, head, position) takes two per row
    body = ["if WIDE:",
            "    row = (pid.to(tl.int64) * RB + tl.arange(0, RB))[:, None]",
            "else:",
            "    row = (pid * RB + tl.arange(0, RB))[:, None]",
            "rmask = row < ROWS",
            "cols = (cb * BLOCK + tl.arange(0, BLOCK))[None, :]"]
    if rank:
        body.append("rest = row")
        for d in reversed(range(1, rank)):  # one division per level: the remainder from the quotient
            body += [f"q{d} = rest // L{d}", f"i{d} = rest - q{d} * L{d}", f"rest = q{d}"]
        body.append("i0 = rest")
    for k in range(len(region.inputs)):
        terms = " + ".join(f"i{d} * in{k}_s{d}" for d in range(rank)) or "row * 0"
        body.append(f"in{k}_off = {terms}")
    # every load first: they depend on the indices only, so a load that the ops reach after a row reduction
    # (LayerNorm's weight and bias) does not wait out its memory latency behind the reduction's barriers
    body += sorted(e.lines, key=lambda line: not line.split(" = ", 1)[1].startswith("tl.load(")) + stores
    meta = {
        "rank": rank,
        "inputs": [inputs.index(n) for n in region.inputs],
        "outputs": [{"width": _width_meta(w), "dtype": str(o.meta["val"].dtype).removeprefix("torch.")}
                    for o, w in zip(region.outputs, out_widths)],
        "span": sorted({_width_meta(w) for w in out_widths + e.reduced_widths}, key=str),
        "reduction": bool(e.reduced_widths),
    }
    return params, body, meta


# launch constants of every generated kernel: rows per program, columns per program, 64-bit indexing
CONSTS = ["RB: tl.constexpr", "BLOCK: tl.constexpr", "WIDE: tl.constexpr"]
# the column blocks of a row block on grid axis 0, the row blocks on axes 1 and 2 (axis 1 holds at most 65535):
# programs launched together read neighbouring memory, as a row-major sweep does, with no division to find a
# program's place. With the row blocks on axis 0 and the column blocks on axis 1, as modules before "flat" did,
# they read rows far apart. H100, SwiGLU over 2048 x 14336 (`benchmarks/fuse_gpu.py`): 64.6 us (0.96x
# torch.compile) on those axes with two rows a program, 62.0 us (1.00x) row-major with one row a program
PROGRAM = ["    cb = tl.program_id(0)", "    pid = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)"]


def emit(region: Region) -> tuple[str, str]:
    """(key, source) of the region's module; the key is a hash of the source, the cache key of the kernel.

    A group of sibling regions (`region.parts`, e.g. RoPE of q and of k) becomes one kernel whose programs
    first cover the rows of the first part, then those of the next: one launch instead of one per region."""
    parts = region.parts or [region]
    built = [_part(p, region.inputs) for p in parts]
    meta = {
        "pattern": classify(region),
        "ops": region.ops(),
        "parts": [m for _, _, m in built],
        "wide": True,  # takes WIDE (modules generated before it index in 64 bits always)
        "flat": True,  # column blocks on grid axis 0, row blocks on 1 and 2 (before it: rows on 0, columns on 1)
    }
    code = []
    if len(parts) == 1:
        params, body, _ = built[0]
        code += ["@triton.jit",
                 f"def kernel({', '.join(params + CONSTS)}):",
                 *PROGRAM,
                 *("    " + line for line in body)]
    else:
        args, starts, functions, names = [], [], {}, []
        for i, (params, body, _) in enumerate(built):
            text = "\n".join(body)
            if text not in functions:  # parts of equal code (q and k RoPE) share one function
                functions[text] = f"part{len(functions)}"
                signature = ", ".join(params + ["pid", "cb"] + CONSTS)
                code += ["@triton.jit",
                         f"def {functions[text]}({signature}):",
                         *("    " + line for line in body), "", ""]
            names.append(functions[text])
            args.append([f"p{i}_{a}" for a in params])
            starts.append(f"START{i}")
        flat = [a for group in args for a in group]
        code += ["@triton.jit",
                 f"def kernel({', '.join(flat + starts[1:] + CONSTS)}):",
                 *PROGRAM]
        for i, group in enumerate(args):
            call = f"{names[i]}({', '.join(group)}, pid{f' - START{i}' if i else ''}, cb, RB, BLOCK, WIDE)"
            if i == 0:
                code.append("    if pid < START1:")
            elif i < len(args) - 1:
                code.append(f"    elif pid < START{i + 1}:")
            else:
                code.append("    else:")
            code.append(f"        {call}")
    source = "\n".join([
        f'"""prunus fused kernel ({meta["pattern"]}): {", ".join(meta["ops"])}."""',
        "import os",
        "",
        "import torch",
        "import triton",
        "import triton.language as tl",
        "",
        f"META = {meta!r}",
        "",
        "",
        _reference_source(region),
        "",
        "",
        *([ops.ROUND_BF16, "", ""] if "round_bf16(" in "\n".join(code) else []),
        *code,
        "",
    ])
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    return key, source
