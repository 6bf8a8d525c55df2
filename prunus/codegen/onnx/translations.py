"""ONNX lowerings of the prunus ops, handed to `torch.onnx.export(custom_translation_table=...)`.

- linear_int4 -> com.microsoft MatMulNBits (4-bit blocks, real-valued zero points), + bias; for group sizes
  MatMulNBits lacks (it takes powers of two from 16 to 256), nibble unpacking + dequantization + MatMul
- linear_int8 -> DequantizeLinear (per output channel) + MatMul. (onnxruntime 1.31's 8-bit MatMulNBits was
  slower on the CPU at both 1 and 256 rows unless it also quantizes activations, which breaks parity.)
- linear_w8a8 -> per-token symmetric int8 activations (the reference op's rule exactly) + MatMulInteger
- linear_fp8  -> DequantizeLinear of the e4m3 weight + MatMul
- embedding_int8 -> Gather of the int8 rows and of their scales, the product in fp32 (the reference's order)
- decode_attention / decode_attention_scores / attention_scores (the KV graphs) -> a decomposition that
  follows the references in `prunus.kernels.decode_attention` step for step: the query heads of each KV
  group stacked as rows (row = head_in_group * t + i), one MatMul against the concatenated cache, the
  causal offset as a Where mask, an fp32 Softmax, and probabilities summed over the group's rows.
- decode_attention_quantized(_scores) (a kv_quant cache) -> the packed codes unpacked (8 bits as they are; 4 bits
  low nibble then high nibble), dequantized in fp32 as `prunus.kernels.kv_quant.dequantize_keys` /
  `dequantize_values` (code * scale + minimum, keys per channel over groups of tokens, values per token over
  groups of channels), concatenated with the residual as the past, then the decode_attention decomposition.
- decode_attention_pruned_keys (ThinK's pruned key channels) -> the older keys' kept channels scattered into
  zero keys of the full head width (a dropped channel adds nothing to q.k), the recent keys after them, then the
  decode_attention_scores decomposition.
"""
from __future__ import annotations

import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset20 as op

_MSFT = onnxscript.values.Opset("com.microsoft", 1)
_P, _A = OpSchema.FormalParameter, OpSchema.Attribute
# onnx itself ships no schemas for onnxruntime's contrib ops: declare the one we emit.
_MATMUL_NBITS_SCHEMA = OpSchema(
    "MatMulNBits", "com.microsoft", 1,
    inputs=[_P("A", "T1"), _P("B", "T2"), _P("scales", "T1"),
            _P("zero_points", "T3", param_option=OpSchema.FormalParameterOption.Optional)],
    outputs=[_P("Y", "T1")],
    type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                      ("T2", ["tensor(uint8)"], ""),
                      ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
    attributes=[_A("K", OpSchema.AttrType.INT, ""), _A("N", OpSchema.AttrType.INT, ""),
                _A("bits", OpSchema.AttrType.INT, ""), _A("block_size", OpSchema.AttrType.INT, "")])
_MatMulNBits = onnxscript.values.Op(_MSFT, "MatMulNBits", _MATMUL_NBITS_SCHEMA)


def _bias(y, bias):
    return y if bias is None else op.Add(y, bias)


_NBITS_BLOCK_SIZES = (16, 32, 64, 128, 256)


def _dequantize_int4(qweight, scales, zeros, group_size: int, k: int, like):
    n, groups = qweight.shape[0], scales.shape[1]
    lo = op.BitwiseAnd(qweight, op.Constant(value=_uint8(15)))
    hi = op.BitShift(qweight, op.Constant(value=_uint8(4)), direction="RIGHT")
    axis = op.Constant(value_ints=[-1])
    q = op.Concat(op.Unsqueeze(lo, axis), op.Unsqueeze(hi, axis), axis=-1)
    q = op.CastLike(op.Reshape(q, op.Constant(value_ints=[n, groups, group_size])), like)
    w = op.Mul(op.Sub(q, op.Unsqueeze(op.CastLike(zeros, like), axis)), op.Unsqueeze(op.CastLike(scales, like), axis))
    w = op.Reshape(w, op.Constant(value_ints=[n, groups * group_size]))
    return op.Slice(w, op.Constant(value_ints=[0]), op.Constant(value_ints=[k]), op.Constant(value_ints=[1]))


def _uint8(v: int):
    import numpy as np
    import onnx

    return onnx.numpy_helper.from_array(np.array(v, dtype=np.uint8))


def linear_int4(x, qweight, scales, zeros, bias, group_size: int):
    # qweight is stored padded to whole groups, which is MatMulNBits' own block layout
    n, k, groups = qweight.shape[0], x.shape[-1], scales.shape[1]
    if group_size not in _NBITS_BLOCK_SIZES:
        w = _dequantize_int4(qweight, scales, zeros, group_size, k, x)
        return _bias(op.MatMul(x, op.Transpose(w, perm=[1, 0])), bias)
    blocks = op.Reshape(qweight, op.Constant(value_ints=[n, groups, group_size // 2]))
    flat = op.Constant(value_ints=[-1])
    if zeros.dtype == onnxscript.ir.DataType.UINT8:
        # integer zero points packed two a byte: onnxruntime's fast 4-bit path (real-valued ones are slower)
        padded = op.Pad(zeros, op.Constant(value_ints=[0, 0, 0, groups % 2]), op.Constant(value=_uint8(0)))
        pairs = op.Reshape(padded, op.Constant(value_ints=[n, (groups + 1) // 2, 2]))
        lo = op.Squeeze(op.Slice(pairs, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]),
                                 op.Constant(value_ints=[2])), op.Constant(value_ints=[2]))
        hi = op.Squeeze(op.Slice(pairs, op.Constant(value_ints=[1]), op.Constant(value_ints=[2]),
                                 op.Constant(value_ints=[2])), op.Constant(value_ints=[2]))
        zero_points = op.Reshape(op.BitwiseOr(lo, op.BitShift(hi, op.Constant(value=_uint8(4)), direction="LEFT")),
                                 flat)
    else:
        zero_points = op.Reshape(op.CastLike(zeros, x), flat)
    y = _MatMulNBits(x, blocks, op.Reshape(op.CastLike(scales, x), flat), zero_points, K=k, N=n, bits=4,
                     block_size=group_size)
    return _bias(y, bias)


def linear_int8(x, qweight, scales, bias):
    w = op.DequantizeLinear(qweight, op.CastLike(scales, x), axis=0)
    return _bias(op.MatMul(x, op.Transpose(w, perm=[1, 0])), bias)


def linear_fp8(x, qweight, scales, bias):
    w = op.DequantizeLinear(qweight, op.CastLike(scales, x), axis=0)
    return _bias(op.MatMul(x, op.Transpose(w, perm=[1, 0])), bias)


def embedding_int8(ids, qweight, scales):
    rows = op.Cast(op.Gather(qweight, ids, axis=0), to=_FLOAT)
    row_scales = op.Unsqueeze(op.Cast(op.Gather(scales, ids, axis=0), to=_FLOAT), op.Constant(value_ints=[-1]))
    return op.CastLike(op.Mul(rows, row_scales), scales)


def linear_w8a8(x, qweight, scales, smooth, bias):
    # in fp32 from x to y, as the reference op computes (and onnxruntime has no bf16 Round)
    xf = op.Cast(x, to=_FLOAT)
    if smooth is not None:
        xf = op.Div(xf, op.Cast(smooth, to=_FLOAT))
    amax = op.ReduceMax(op.Abs(xf), op.Constant(value_ints=[-1]), keepdims=1)
    a_scale = op.Div(op.Max(amax, op.Constant(value_float=1e-12)), op.Constant(value_float=127.0))
    xq = op.Cast(op.Clip(op.Round(op.Div(xf, a_scale)), op.Constant(value_float=-127.0),
                         op.Constant(value_float=127.0)), to=3)  # INT8
    acc = op.MatMulInteger(xq, op.Transpose(qweight, perm=[1, 0]))
    y = op.Mul(op.Mul(op.Cast(acc, to=_FLOAT), a_scale), op.Cast(scales, to=_FLOAT))
    return op.CastLike(y if bias is None else op.Add(y, op.Cast(bias, to=_FLOAT)), x)


_FLOAT = onnxscript.ir.DataType.FLOAT


def _i64(*values):
    return op.Constant(value_ints=list(values))


def _dim(x, axis: int):
    """Size of `x` along `axis` as an int64 scalar (dynamic sizes stay symbolic)."""
    return op.Squeeze(op.Shape(x, start=axis, end=axis + 1), _i64(0))


def _grouped_probs(q, k, hk: int, d: int, scale: float, visible):
    """Softmax(q k^T * scale) over the keys `visible` lets each row see, with q's heads stacked per KV
    group: q [b, h, t, d], k [b, hk, m, d] -> probabilities fp32 [b, hk, (h // hk) * t, m]."""
    qg = op.Reshape(op.Cast(q, to=_FLOAT), _i64(0, hk, -1, d))
    logits = op.Mul(op.MatMul(qg, op.Transpose(op.Cast(k, to=_FLOAT), perm=[0, 1, 3, 2])),
                    op.Constant(value_float=scale))
    return op.Softmax(op.Where(visible, logits, op.Constant(value_float=float("-inf"))), axis=-1)


def _causal(rows, count, offset, keys):
    """Bool [rows, keys]: stacked query row r sits at position `offset + r mod count` (rows cycle through the
    tokens, one cycle per query head of the group) and sees keys 0..its position; also the key indices."""
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    position = op.Add(op.Mod(op.Range(zero, rows, one), count), offset)
    j = op.Range(zero, keys, one)
    return op.LessOrEqual(op.Unsqueeze(j, _i64(0)), op.Unsqueeze(position, _i64(1))), j


def _decode_attention(q, k_past, v_past, k_new, v_new, scale: float, past_lengths):
    # sizes from the new entries, a graph input: a dequantized past is computed, its shape unknown here
    h, hk, dv = q.shape[1], k_new.shape[1], v_new.shape[3]
    n, t = _dim(k_past, 2), _dim(q, 2)
    k = op.Concat(op.Cast(k_past, to=_FLOAT), op.Cast(k_new, to=_FLOAT), axis=2)
    v = op.Concat(op.Cast(v_past, to=_FLOAT), op.Cast(v_new, to=_FLOAT), axis=2)
    # new token i sits at n + i: it sees every cached entry and the new entries up to itself
    visible, j = _causal(op.Mul(t, op.Constant(value_int=h // hk)), t, n, op.Add(n, t))
    if past_lengths is not None:
        # a ragged cache: head (b, g) holds only its first past_lengths[b, g] cached entries
        held = op.Or(op.Less(j, op.Unsqueeze(op.Cast(past_lengths, to=onnxscript.ir.DataType.INT64), _i64(-1))),
                     op.GreaterOrEqual(j, n))
        visible = op.And(visible, op.Unsqueeze(held, _i64(2)))
        v = op.Where(op.Unsqueeze(held, _i64(3)), v, op.Constant(value_float=0.0))  # padding may be NaN
    probs = _grouped_probs(q, k, hk, q.shape[3], scale, visible)
    out = op.CastLike(op.Reshape(op.MatMul(probs, v), _i64(0, h, -1, dv)), q)
    return out, probs


def decode_attention(q, k_past, v_past, k_new, v_new, scale: float, past_lengths=None):
    return _decode_attention(q, k_past, v_past, k_new, v_new, scale, past_lengths)[0]


def decode_attention_scores(q, k_past, v_past, k_new, v_new, scale: float, past_lengths=None):
    out, probs = _decode_attention(q, k_past, v_past, k_new, v_new, scale, past_lengths)
    return out, op.ReduceSum(probs, _i64(2), keepdims=0)


def _unpack(packed, bits: int):
    """uint8 [b, hk, n, c * bits / 8] -> uint8 [b, hk, n, c], as `kv_quant.unpack`."""
    if bits == 8:
        return packed
    low = op.BitwiseAnd(packed, op.Constant(value=_uint8(15)))
    high = op.BitShift(packed, op.Constant(value=_uint8(4)), direction="RIGHT")
    pairs = op.Concat(op.Unsqueeze(low, _i64(-1)), op.Unsqueeze(high, _i64(-1)), axis=-1)
    # 0 copies a dimension: the entries may be none (a -1 could not be inferred then)
    return op.Reshape(pairs, _i64(0, 0, 0, 2 * packed.shape[3]))


def _dequantize(codes, scale, minimum, group_axis: int):
    """fp32 codes * scale + minimum, one scale and minimum per group: broadcast along the group's `group_axis`."""
    axis = _i64(group_axis)
    return op.Add(op.Mul(op.Cast(codes, to=_FLOAT), op.Unsqueeze(op.Cast(scale, to=_FLOAT), axis)),
                  op.Unsqueeze(op.Cast(minimum, to=_FLOAT), axis))


def _dequantized_past(k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, bits: int, group_size: int):
    """fp32 keys and values [quantized entries, residual] (`decode_attention_quantized_reference`'s past)."""
    d, dv, v_groups = k_scale.shape[3], v_res.shape[3], v_scale.shape[3]
    # keys: groups of group_size tokens of one channel share k_scale / k_min [b, hk, n_q / G, d]
    codes = op.Reshape(_unpack(k_q, bits), _i64(0, 0, -1, group_size, d))
    k = op.Reshape(_dequantize(codes, k_scale, k_min, 3), _i64(0, 0, -1, d))
    # values: groups of dv / v_groups channels of one token share v_scale / v_min [b, hk, n_q, v_groups]
    codes = op.Reshape(_unpack(v_q, bits), _i64(0, 0, 0, v_groups, dv // v_groups))
    v = op.Reshape(_dequantize(codes, v_scale, v_min, 4), _i64(0, 0, 0, dv))
    return op.Concat(k, op.Cast(k_res, to=_FLOAT), axis=2), op.Concat(v, op.Cast(v_res, to=_FLOAT), axis=2)


def decode_attention_quantized(q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new, v_new,
                               scale: float, bits: int, group_size: int):
    k, v = _dequantized_past(k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, bits, group_size)
    return decode_attention(q, k, v, k_new, v_new, scale)


def decode_attention_quantized_scores(q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new, v_new,
                                      scale: float, bits: int, group_size: int):
    k, v = _dequantized_past(k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, bits, group_size)
    return decode_attention_scores(q, k, v, k_new, v_new, scale)


def decode_attention_pruned_keys(q, channels, k_pruned, k_recent, v_past, k_new, v_new, scale: float):
    full_shape = op.Concat(op.Shape(k_pruned, start=0, end=3), _i64(q.shape[3]), axis=0)
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), k_pruned), full_shape)
    index = op.Expand(op.Unsqueeze(channels, _i64(2)), op.Shape(k_pruned))  # [b, hk, n_p, d_kept]
    older = op.ScatterElements(zeros, index, k_pruned, axis=3)
    return decode_attention_scores(q, op.Concat(older, op.CastLike(k_recent, older), axis=2), v_past, k_new, v_new,
                                   scale)


def attention_scores(q, k, window: int, scale: float):
    h, hk, d = q.shape[1], k.shape[1], q.shape[3]
    # the last w = min(window, s) queries (Slice clamps the start); query i of them sits at s - w + i
    last = op.Slice(q, _i64(-window), _i64(2 ** 62), _i64(2))
    w, s = _dim(last, 2), _dim(k, 2)
    visible, _ = _causal(op.Mul(w, op.Constant(value_int=h // hk)), w, op.Sub(s, w), s)
    return op.ReduceSum(_grouped_probs(last, k, hk, d, scale, visible), _i64(2), keepdims=0)


def translation_table() -> dict:
    import torch

    import prunus.kernels  # noqa: F401  (registers torch.ops.prunus.*)
    import prunus.passes.kv.pruned_keys  # noqa: F401  (registers torch.ops.prunus.decode_attention_pruned_keys)

    p = torch.ops.prunus
    return {p.linear_int4.default: linear_int4, p.linear_int8.default: linear_int8,
            p.linear_w8a8.default: linear_w8a8, p.linear_fp8.default: linear_fp8,
            p.embedding_int8.default: embedding_int8,
            p.decode_attention.default: decode_attention, p.decode_attention_scores.default: decode_attention_scores,
            p.attention_scores.default: attention_scores,
            p.decode_attention_quantized.default: decode_attention_quantized,
            p.decode_attention_quantized_scores.default: decode_attention_quantized_scores,
            p.decode_attention_pruned_keys.default: decode_attention_pruned_keys}
