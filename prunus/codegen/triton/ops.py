"""The op table of the Triton code generator: which ATen ops fuse, and the Triton expression of each.

Every value inside a fused region is a float32 register block over one row's columns. An elementwise op
maps operand expressions to an expression (`ELEMENTWISE`); a reduction over the last dim turns a row into
one scalar per row (`REDUCTIONS`); composite row ops (layer_norm, softmax, rms_norm) are written in terms
of those two (`COMPOSITES`, expanded by the emitter); slice and cat along the last dim remap the column
index (`INDEXING`). Anything else ends a region.
"""
from __future__ import annotations

import math

import torch

aten = torch.ops.aten

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TL_DTYPE = {torch.float32: "tl.float32", torch.bfloat16: "tl.bfloat16", torch.float16: "tl.float16"}


def _scalar(v) -> str:
    v = float(v)
    if math.isinf(v):
        return "float('inf')" if v > 0 else "float('-inf')"
    if math.isnan(v):
        return "float('nan')"
    return repr(v)


def _pow(x, exponent):
    e = float(exponent)
    if e == 0.5:
        return f"tl.sqrt({x})"
    if e == -0.5:
        return f"tl.rsqrt({x})"
    if e == int(e) and 1 <= abs(e) <= 4:
        prod = " * ".join([x] * int(abs(e)))
        return f"({prod})" if e > 0 else f"(1.0 / ({prod}))"
    return None  # a general power needs exp(log x): wrong for x < 0, so it stays unfused


def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1: tl has sigmoid everywhere (the CUDA libdevice tanh is not in the interpreter)
    return f"(2.0 * tl.sigmoid(2.0 * {x}) - 1.0)"


def _gelu(x, approximate="none"):
    if approximate == "tanh":
        return f"(0.5 * {x} * (1.0 + {_tanh(f'(0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x}))')}))"
    return f"(0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476)))"


def _binary(op):
    def emit(a, b, alpha=1):
        if alpha != 1:
            b = f"({b} * {_scalar(alpha)})"
        return f"({a} {op} {b})"
    return emit


def _round_to(x, dtype):
    # An op that produces bf16/fp16 rounds: keep that rounding so the fused graph matches the unfused one
    # (`round_bf16`, in every generated module that needs it).
    if dtype is torch.bfloat16:
        return f"round_bf16({x})"
    if dtype is torch.float16:
        return f"{x}.to(tl.float16).to(tl.float32)"
    return x


# Round-to-nearest-even of float32 to bfloat16, kept in float32 (NaN and inf stay NaN and inf). Compiled, a
# conversion pair: Triton keeps each rounding and emits bf16 arithmetic where the operands allow (mul.rn.bf16x2,
# add.rn.bf16x2: each op correctly rounded, which for bf16 operands equals eager's fp32 op then rounding; the
# runtime launches with FMA contraction off, which would fuse a product into a sum unrounded). Through the bits
# instead costs about four integer instructions a rounding: RoPE's kernel is 400 SASS instructions against 904 before
# (BENCHMARKS.md, "Static SASS counts"). The interpreter's bf16 conversion truncates, so there the rounding goes
# through the bits.
ROUND_BF16 = """INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def round_bf16(x):
    if INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)"""


# op -> function(operand expressions..., **scalar kwargs) -> expression. Tensor operands arrive as
# expressions; Python scalars arrive as literals rendered by `_scalar`.
ELEMENTWISE = {
    aten.add.Tensor: _binary("+"), aten.add.Scalar: _binary("+"),
    aten.sub.Tensor: _binary("-"), aten.sub.Scalar: _binary("-"),
    aten.mul.Tensor: _binary("*"), aten.mul.Scalar: _binary("*"),
    aten.div.Tensor: _binary("/"), aten.div.Scalar: _binary("/"),
    aten.rsub.Scalar: lambda a, b, alpha=1: _binary("-")(b, a, 1) if alpha == 1 else f"({b} - {a} * {_scalar(alpha)})",
    aten.neg.default: lambda x: f"(-{x})",
    aten.exp.default: lambda x: f"tl.exp({x})",
    aten.log.default: lambda x: f"tl.log({x})",
    aten.sqrt.default: lambda x: f"tl.sqrt({x})",
    aten.rsqrt.default: lambda x: f"tl.rsqrt({x})",
    aten.reciprocal.default: lambda x: f"(1.0 / {x})",
    aten.abs.default: lambda x: f"tl.abs({x})",
    aten.sin.default: lambda x: f"tl.sin({x})",
    aten.cos.default: lambda x: f"tl.cos({x})",
    aten.sigmoid.default: lambda x: f"tl.sigmoid({x})",
    aten.tanh.default: _tanh,
    aten.erf.default: lambda x: f"tl.erf({x})",
    aten.relu.default: lambda x: f"tl.maximum({x}, 0.0)",
    aten.silu.default: lambda x: f"({x} * tl.sigmoid({x}))",
    aten.gelu.default: _gelu,
    aten.maximum.default: lambda a, b: f"tl.maximum({a}, {b})",
    aten.minimum.default: lambda a, b: f"tl.minimum({a}, {b})",
    aten.pow.Tensor_Scalar: _pow,
}

# Casts and no-ops in eval: the value passes through (rounded to the target dtype when it narrows).
CASTS = {aten._to_copy.default, aten.to.dtype, aten.clone.default, aten.alias.default, aten.dropout.default,
         aten.contiguous.default}

# Reductions over the last dim with keepdim=True: op -> (combine, identity, finish(sum_expr, width)).
REDUCTIONS = {
    aten.mean.dim: ("tl.sum", "0.0", lambda r, n: f"({r} / {n})"),
    aten.sum.dim_IntList: ("tl.sum", "0.0", lambda r, n: r),
    aten.amax.default: ("tl.max", "float('-inf')", lambda r, n: r),
}

COMPOSITES = {aten.layer_norm.default, aten.softmax.int, aten._softmax.default, aten.rms_norm.default}

INDEXING = {aten.slice.Tensor, aten.cat.default}

# Ops whose result is exactly representable in their input's dtype (no rounding needed when it is narrow).
EXACT = INDEXING | CASTS | {aten.neg.default, aten.abs.default, aten.relu.default}

# Ops that count as work when deciding whether a region is worth a kernel (casts and indexing are not).
COMPUTE = set(ELEMENTWISE) | set(REDUCTIONS) | COMPOSITES


def _last_dim(dim, rank: int) -> bool:
    return isinstance(dim, int) and (dim == -1 or dim == rank - 1)


def fusible(node: torch.fx.Node) -> bool:
    """Whether `node` can live in a fused region: a float op of the table, reducing or indexing the last dim only."""
    if node.op != "call_function":
        return False
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype not in FLOAT_DTYPES or val.dim() == 0:
        return False
    for a in node.all_input_nodes:
        av = a.meta.get("val")
        if not isinstance(av, torch.Tensor) or av.dtype not in FLOAT_DTYPES:
            return False
    t, args, kwargs, rank = node.target, node.args, node.kwargs, val.dim()
    if t in ELEMENTWISE:
        if t is aten.pow.Tensor_Scalar:
            return isinstance(args[1], (int, float)) and _pow("x", args[1]) is not None
        if t is aten.gelu.default:
            return kwargs.get("approximate", args[1] if len(args) > 1 else "none") in ("none", "tanh")
        if t in (aten.div.Tensor, aten.div.Scalar) and kwargs.get("rounding_mode") is not None:
            return False
        return all(isinstance(a, (torch.fx.Node, int, float)) and not isinstance(a, bool) for a in args) \
            and set(kwargs) <= {"alpha"}
    if t in CASTS:
        if t is aten.dropout.default:
            return len(args) > 2 and args[2] is False
        if t is aten.to.dtype:
            return len(args) == 2 and not kwargs
        allowed = {"dtype"} if t is aten._to_copy.default else set()
        return len(args) == 1 and set(kwargs) <= allowed and kwargs.get("dtype", val.dtype) in FLOAT_DTYPES
    if t in REDUCTIONS:
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        return (keep is True and isinstance(dims, (list, tuple)) and len(dims) == 1 and _last_dim(dims[0], rank)
                and not kwargs.get("dtype"))
    if t is aten.layer_norm.default:
        return len(args[1]) == 1 and all(isinstance(a, torch.fx.Node) or a is None for a in args[2:4])
    if t is aten.rms_norm.default:
        return len(args[1]) == 1
    if t in (aten.softmax.int, aten._softmax.default):
        return _last_dim(args[1], rank)
    if t is aten.slice.Tensor:
        dim = args[1] if len(args) > 1 else 0
        step = args[4] if len(args) > 4 else 1
        return _last_dim(dim, rank) and step == 1 and all(isinstance(a, int) for a in args[2:4])
    if t is aten.cat.default:
        dim = args[1] if len(args) > 1 else 0
        return _last_dim(dim, rank) and all(isinstance(a.meta["val"].shape[-1], int) for a in args[0])
    return False
