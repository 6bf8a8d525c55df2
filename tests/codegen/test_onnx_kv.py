"""The KV graphs in ONNX: translations of the attention ops, prefill.onnx / decode.onnx in the artifact, and
greedy generation over onnxruntime against PyTorch (policy full, snapkv with a budget, and h2o over a 4-bit
kv_quant cache; tiny llama)."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.export import Dim

import prunus
from prunus.codegen.onnx import OrtKVDecoder, export_kv_onnx, run_onnx
from prunus.codegen.onnx.export import lower_program
from prunus.kernels import kv_quant as kq
from prunus.kernels.decode_attention import attention_scores_reference, decode_attention_reference
from prunus.passes.kv import KVDecoder

PIPELINE = "kv_cache(policy=snapkv, budget=12, sink=2, window=4)"
SCALE = 0.3


@pytest.fixture(scope="module")
def kv_artifact(tiny_models, tmp_path_factory):
    """The tiny llama through kv_cache (snapkv, budget 12) saved with ONNX once for the module."""
    model, ex = tiny_models("llama")
    opt = prunus.optimize(model, PIPELINE, example_inputs=ex)
    path = opt.save(str(tmp_path_factory.mktemp("kv") / "art"), onnx=True)
    return model, opt, path


def _ids(b, s, seed):
    return torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(seed))


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_artifact_holds_prefill_and_decode_graphs(kv_artifact):
    import onnx

    model, opt, path = kv_artifact
    assert {"model.onnx", "prefill.onnx", "decode.onnx", "pipeline.json"} <= set(os.listdir(path))
    with open(os.path.join(path, "pipeline.json")) as f:
        assert json.load(f)["kv"] == opt.graph.kv
    layers = model.config.num_hidden_layers
    prefill = onnx.load(os.path.join(path, "prefill.onnx"))
    inputs = {i.name: _dims(i) for i in prefill.graph.input}
    assert list(inputs) == ["input_ids", "positions"] and all(isinstance(d, str) for d in inputs["input_ids"])
    assert [o.name for o in prefill.graph.output][-layers:] == [f"scores_{i}" for i in range(layers)]
    decode = onnx.load(os.path.join(path, "decode.onnx"))
    inputs = {i.name: _dims(i) for i in decode.graph.input}
    assert list(inputs)[:4] == ["input_ids", "positions", "k_past_0", "v_past_0"] and len(inputs) == 2 + 2 * layers
    assert all(isinstance(d, str) for d in inputs["input_ids"])  # batch and new tokens are dynamic
    assert isinstance(inputs["k_past_0"][2], str) and inputs["k_past_0"][1:4:2] == [2, 16]  # kv heads, head dim
    assert inputs["k_past_0"][2] != inputs["k_past_1"][2]  # every layer's past length is its own
    outputs = [o.name for o in decode.graph.output]
    assert outputs[-3 * layers:] == [f"{k}_{i}" for i in range(layers) for k in "kv"] + \
        [f"probs_{i}" for i in range(layers)]


def test_ort_steps_match_pytorch_at_new_shapes(kv_artifact):
    """Batch 3, a 17-token prefill, a 2-token chunk, then single tokens: logits and the evicted cache agree."""
    _, opt, path = kv_artifact
    ort, ref = OrtKVDecoder(path), KVDecoder(opt.graph)
    ids = _ids(3, 24, seed=3)
    for chunk in (ids[:, :17], ids[:, 17:19], *ids[:, 19:].split(1, dim=1)):
        got, want = ort.feed(chunk), ref.feed(chunk)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert ort.cache_lengths() == ref.cache_lengths() and max(ort.cache_lengths()) <= 12
        assert ort.cache_bytes() == ref.cache_bytes()
        for a, b in zip(ort.caches, ref.caches):
            assert torch.equal(a.pos, b.pos)  # the policy kept the same entries


def test_greedy_over_ort_equals_pytorch(kv_artifact):
    model, _, path = kv_artifact
    ids = _ids(2, 20, seed=1)
    full = OrtKVDecoder(path, {"policy": "full"})
    assert torch.equal(prunus.generate(full, ids, 16), prunus.generate(model, ids, 16))
    loaded = prunus.load(path)  # the reloaded artifact decodes under its saved policy (snapkv, budget 12)
    want, want_stats = prunus.generate(loaded, ids, 16, return_stats=True)
    got, stats = prunus.generate(OrtKVDecoder(path), ids, 16, return_stats=True)
    assert torch.equal(got, want)
    _, full_stats = prunus.generate(full, ids, 16, return_stats=True)
    assert stats["kv_bytes"] == want_stats["kv_bytes"] < full_stats["kv_bytes"]
    # called as a model, the decoder returns the prefill's logits
    torch.testing.assert_close(OrtKVDecoder(path)(ids), model(ids).logits, rtol=1e-4, atol=1e-4)


def test_gpt2_full_cache_over_ort(tiny_models, tmp_path):
    """GPT-2: fused qkv, learned positions, no GQA; policy full lowers plain decode_attention (no scores)."""
    import onnx

    model, ex = tiny_models("gpt2")
    opt = prunus.optimize(model, "kv_cache", example_inputs=ex)
    export_kv_onnx(opt.graph, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["decode.onnx", "kv.onnx.data", "prefill.onnx"]
    # the weights are stored once for both graphs: every large decode initializer points where prefill's does
    offsets = [{dict((e.key, e.value) for e in t.external_data)["offset"]
                for t in onnx.load(str(tmp_path / f), load_external_data=False).graph.initializer if t.external_data}
               for f in ("prefill.onnx", "decode.onnx")]
    assert len(offsets[1]) >= 8 and offsets[1] <= offsets[0]
    ids = _ids(2, 11, seed=2)
    assert torch.equal(prunus.generate(OrtKVDecoder(str(tmp_path)), ids, 12), prunus.generate(model, ids, 12))


def test_dropped_prompt_tokens_export_and_decode_over_ort(tiny_models, tmp_path):
    """drop_tokens then kv_cache (default sinks): the export example keeps more tokens than the stage must, so
    top-k breaks no ties, and greedy decoding over onnxruntime equals PyTorch's."""
    model, ex = tiny_models("llama")
    opt = prunus.optimize(model, "drop_tokens(method=attention, keep=0.5, after_layer=1), kv_cache", example_inputs=ex)
    export_kv_onnx(opt.graph, str(tmp_path))
    ids = _ids(1, 30, seed=3)
    assert torch.equal(prunus.generate(OrtKVDecoder(str(tmp_path)), ids, 8), prunus.generate(opt, ids, 8))


def _bytes_tokenizer(text, **kwargs):
    """The tiny llama's 256-token vocabulary read as bytes: a tokenizer for prunus.eval without a download."""
    return SimpleNamespace(input_ids=torch.tensor([list(text.encode())]))


def test_eval_runs_over_ort(kv_artifact):
    model, _, path = kv_artifact
    text = "The quick brown fox jumps over the lazy dog, again and again."
    ort = OrtKVDecoder(path)
    want = prunus.eval.long_ppl(prunus.load(path), _bytes_tokenizer, text=text, max_tokens=40)
    assert prunus.eval.long_ppl(ort, _bytes_tokenizer, text=text, max_tokens=40) == pytest.approx(want, rel=1e-4)
    metrics = prunus.eval.fidelity(model, ort, _ids(2, 9, seed=4))
    assert metrics["top1"] == 1.0 and metrics["sqnr_db"] > 60


def test_kv_export_and_decoder_errors(kv_artifact, tmp_path):
    _, opt, path = kv_artifact
    with pytest.raises(prunus.ArtifactError, match="prefill.onnx"):
        OrtKVDecoder(str(tmp_path))
    for name in ("prefill.onnx", "decode.onnx"):
        (tmp_path / name).write_bytes(b"not a model")
    with pytest.raises(prunus.ArtifactError, match="not a KV graph"):
        OrtKVDecoder(str(tmp_path))
    with pytest.raises(prunus.SpecError, match="export it for this policy"):
        OrtKVDecoder(path, {"policy": "h2o", "budget": 12})  # scores every prompt query: not in prefill.onnx
    with pytest.raises(prunus.SpecError, match="layout"):
        OrtKVDecoder(path, {**opt.graph.kv, "policy": "adakv"})  # a ragged cache: decode.onnx takes no lengths


# h2o reads every decode step's attention: its decode graph runs decode_attention_quantized_scores
QUANT_PIPELINE = "kv_cache(policy=h2o, budget=16, sink=2, window=4), kv_quant(bits=4, group_size=4, residual=2)"


def test_kv_quant_cache_over_ort(tiny_models, tmp_path):
    """4 bits under h2o eviction (8 bits differ only in the unpacking, which the translation test covers): the
    packed cache crosses the session boundary each step (bfloat16 scales included); logits, the quantized
    entries and what eviction keeps agree with PyTorch's decode graph, and greedy generation is the same."""
    model, ex = tiny_models("llama")
    opt = prunus.optimize(model, QUANT_PIPELINE, example_inputs=ex)
    export_kv_onnx(opt.graph, str(tmp_path))
    ort, ref = OrtKVDecoder(str(tmp_path)), KVDecoder(opt.graph)
    ids = _ids(2, 26, seed=4)
    for chunk in (ids[:, :13], ids[:, 13:15], *ids[:, 15:].split(1, dim=1)):
        torch.testing.assert_close(ort.feed(chunk), ref.feed(chunk), rtol=1e-4, atol=1e-4)
        assert ort.cache_bytes() == ref.cache_bytes()
        for a, b in zip(ort.caches, ref.caches):
            assert a.n_quantized == b.n_quantized > 0 and torch.equal(a.pos, b.pos)
            assert torch.equal(a.k_q, b.k_q) and a.k_scale.dtype == torch.bfloat16
    assert max(ort.cache_lengths()) <= 16
    ids = _ids(1, 14, seed=5)
    assert torch.equal(prunus.generate(OrtKVDecoder(str(tmp_path)), ids, 10), prunus.generate(opt, ids, 10))
    other = {**opt.graph.kv, "quant": {**opt.graph.kv["quant"], "bits": 8}}
    with pytest.raises(prunus.SpecError, match="export it for this storage"):
        OrtKVDecoder(str(tmp_path), other)
    OrtKVDecoder(str(tmp_path), {**opt.graph.kv, "quant": {**opt.graph.kv["quant"], "residual": 5}})  # runtime only


class QuantizedAttentionOps(torch.nn.Module):
    def __init__(self, bits, group_size):
        super().__init__()
        self.bits, self.group_size = bits, group_size

    def forward(self, q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new, v_new):
        args = (q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new, v_new, SCALE, self.bits,
                self.group_size)
        return (torch.ops.prunus.decode_attention_quantized(*args),
                *torch.ops.prunus.decode_attention_quantized_scores(*args))


def _quantized_inputs(b, t, groups, r, bits, group_size, seed, h=4, hk=2, d=8):
    g = torch.Generator().manual_seed(seed)
    n = groups * group_size
    keys = kq.quantize_keys(torch.randn(b, hk, n, d, generator=g), bits, group_size, torch.bfloat16)
    values = kq.quantize_values(torch.randn(b, hk, n, d, generator=g), bits, group_size, torch.bfloat16)
    rest = [torch.randn(b, hk, m, d, generator=g) for m in (r, r, t, t)]
    return (torch.randn(b, h, t, d, generator=g), *keys, *values, *rest)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_attention_translations_match_the_references(tmp_path, bits):
    names = ["q", "k_q", "k_scale", "k_min", "v_q", "v_scale", "v_min", "k_res", "v_res", "k_new", "v_new"]
    args = _quantized_inputs(2, 3, 2, 2, bits, 4, seed=0)
    program = torch.export.export(QuantizedAttentionOps(bits, 4), args,
                                  dynamic_shapes=tuple({0: Dim.AUTO, 2: Dim.AUTO} for _ in args), strict=False)
    path = str(tmp_path / "ops.onnx")
    lower_program(program, path, names, ["out", "out_scores", "probs"])
    # new shapes, among them no quantized entries (before the first flush) and no residual (right after one)
    for b, t, groups, r in ((2, 3, 2, 2), (3, 1, 0, 2), (1, 2, 3, 0), (1, 1, 0, 0)):
        x = _quantized_inputs(b, t, groups, r, bits, 4, seed=b + groups)
        got = run_onnx(path, list(x), names)
        want = [kq.decode_attention_quantized_reference(*x, SCALE, bits, 4),
                *torch.ops.prunus.decode_attention_quantized_scores(*x, SCALE, bits, 4)]
        for g_, w in zip(got, want):
            np.testing.assert_allclose(g_, w.numpy(), rtol=1e-5, atol=1e-5)


class AttentionOps(torch.nn.Module):
    def forward(self, q, k_past, v_past, k_new, v_new, lengths, qs, ks):
        p = torch.ops.prunus
        ragged = p.decode_attention(q, k_past, v_past, k_new, v_new, SCALE, lengths)
        out, probs = p.decode_attention_scores(q, k_past, v_past, k_new, v_new, SCALE)
        return (ragged, out, probs, p.attention_scores(qs, ks, 3, SCALE),
                p.attention_scores(qs, ks, 2 ** 31 - 1, SCALE))


def _attention_inputs(b, t, n, s, seed, h=4, hk=2, d=8):
    g = torch.Generator().manual_seed(seed)
    q, k_past, v_past = (torch.randn(b, x, m, d, generator=g) for x, m in ((h, t), (hk, n), (hk, n)))
    k_new, v_new = torch.randn(b, hk, t, d, generator=g), torch.randn(b, hk, t, d, generator=g)
    lengths = torch.randint(0, n + 1, (b, hk), generator=g)
    beyond = torch.arange(n)[None, None, :, None] >= lengths[..., None, None]
    k_past, v_past = k_past.masked_fill(beyond, 1e4), v_past.masked_fill(beyond, -1e4)  # padding is never read
    qs, ks = torch.randn(b, h, s, d, generator=g), torch.randn(b, hk, s, d, generator=g)
    return q, k_past, v_past, k_new, v_new, lengths, qs, ks


def test_attention_translations_match_the_references(tmp_path):
    args = _attention_inputs(2, 3, 5, 6, seed=0)
    names = ["q", "k_past", "v_past", "k_new", "v_new", "lengths", "qs", "ks"]
    b, t, n, s = (Dim.AUTO,) * 4
    dyn = ({0: b, 2: t}, {0: b, 2: n}, {0: b, 2: n}, {0: b, 2: t}, {0: b, 2: t}, {0: b}, {0: b, 2: s}, {0: b, 2: s})
    program = torch.export.export(AttentionOps(), args, dynamic_shapes=dyn, strict=False)
    path = str(tmp_path / "ops.onnx")
    lower_program(program, path, names, ["ragged", "out", "probs", "window_scores", "all_scores"])
    # a new shape: one new token (decode), a prefill shorter than the window
    for b, t, n, s in ((2, 3, 5, 6), (3, 1, 4, 2), (1, 2, 0, 9)):
        q, k_past, v_past, k_new, v_new, lengths, qs, ks = x = _attention_inputs(b, t, n, s, seed=b)
        got = run_onnx(path, list(x), names)
        want = [decode_attention_reference(q, k_past, v_past, k_new, v_new, SCALE, lengths),
                *decode_attention_reference(q, k_past, v_past, k_new, v_new, SCALE, return_probs=True),
                attention_scores_reference(qs, ks, 3, SCALE), attention_scores_reference(qs, ks, 2 ** 31 - 1, SCALE)]
        for g_, w in zip(got, want):
            np.testing.assert_allclose(g_, w.numpy(), rtol=1e-5, atol=1e-5)


def test_a_kv_op_without_lowering_is_an_export_error_naming_it(tmp_path, monkeypatch):
    import prunus.codegen.onnx.export as export

    table = export.translation_table()
    monkeypatch.setattr(export, "translation_table",
                        lambda: {k: v for k, v in table.items() if "decode_attention" not in str(k)})
    args = _attention_inputs(2, 3, 5, 6, seed=0)[:5]
    program = torch.export.export(_DecodeOnly(), args, strict=False)
    with pytest.raises(prunus.ExportError, match="decode_attention"):
        lower_program(program, str(tmp_path / "m.onnx"), [f"x{i}" for i in range(5)], ["out"])


class _DecodeOnly(torch.nn.Module):
    def forward(self, q, k_past, v_past, k_new, v_new):
        return torch.ops.prunus.decode_attention(q, k_past, v_past, k_new, v_new, SCALE)


THINK_PIPELINE = "kv_cache(policy=think, key_ratio=0.5, budget=14, sink=2, window=4)"


def test_think_pruned_key_channels_over_ort(tiny_models, tmp_path):
    """ThinK: older keys keep half their channels; the decode graph's pruned-key attention lowers to ONNX, the
    cache (kept channels, pruned keys, the window's full keys) crosses the session boundary each step, and
    logits, cache and greedy generation agree with PyTorch."""
    model, ex = tiny_models("llama")
    opt = prunus.optimize(model, THINK_PIPELINE, example_inputs=ex)
    path = opt.save(str(tmp_path / "art"), onnx=True)
    assert {"prefill.onnx", "decode.onnx"} <= set(os.listdir(path))
    ort, ref = OrtKVDecoder(path), KVDecoder(opt.graph)
    ids = _ids(2, 24, seed=6)
    for chunk in (ids[:, :12], ids[:, 12:14], *ids[:, 14:].split(1, dim=1)):
        torch.testing.assert_close(ort.feed(chunk), ref.feed(chunk), rtol=1e-4, atol=1e-4)
        assert ort.cache_bytes() == ref.cache_bytes() and ort.cache_lengths() == ref.cache_lengths()
    assert max(ort.cache_lengths()) <= 14
    ids = _ids(1, 16, seed=7)
    assert torch.equal(prunus.generate(OrtKVDecoder(path), ids, 8), prunus.generate(opt, ids, 8))


class PrunedKeysOp(torch.nn.Module):
    def forward(self, q, channels, k_pruned, k_recent, v_past, k_new, v_new):
        return torch.ops.prunus.decode_attention_pruned_keys(q, channels, k_pruned, k_recent, v_past, k_new, v_new,
                                                             SCALE)


def _pruned_inputs(b, t, n_p, n_r, seed, h=4, hk=2, d=8, kept=3):
    g = torch.Generator().manual_seed(seed)
    channels = torch.rand(b, hk, d, generator=g).argsort(-1)[..., :kept].sort(-1).values
    return (torch.randn(b, h, t, d, generator=g), channels, torch.randn(b, hk, n_p, kept, generator=g),
            torch.randn(b, hk, n_r, d, generator=g), torch.randn(b, hk, n_p + n_r, d, generator=g),
            torch.randn(b, hk, t, d, generator=g), torch.randn(b, hk, t, d, generator=g))


def test_pruned_keys_translation_matches_the_reference(tmp_path):
    from prunus.passes.kv.pruned_keys import decode_attention_pruned_keys

    names = ["q", "channels", "k_pruned", "k_recent", "v_past", "k_new", "v_new"]
    args = _pruned_inputs(2, 3, 5, 2, seed=0)
    b, t, n_p, n_r = (Dim.AUTO,) * 4
    dyn = ({0: b, 2: t}, {0: b}, {0: b, 2: n_p}, {0: b, 2: n_r}, {0: b, 2: Dim.AUTO}, {0: b, 2: t}, {0: b, 2: t})
    program = torch.export.export(PrunedKeysOp(), args, dynamic_shapes=dyn, strict=False)
    path = str(tmp_path / "ops.onnx")
    lower_program(program, path, names, ["out", "probs"])
    for b, t, n_p, n_r in ((2, 3, 5, 2), (3, 1, 0, 4), (1, 2, 7, 0)):  # also nothing pruned yet, no window
        x = _pruned_inputs(b, t, n_p, n_r, seed=b + n_p)
        got = run_onnx(path, list(x), names)
        for g_, w in zip(got, decode_attention_pruned_keys(*x, SCALE)):
            np.testing.assert_allclose(g_, w.numpy(), rtol=1e-5, atol=1e-5)
