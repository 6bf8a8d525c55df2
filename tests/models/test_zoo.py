import os

import numpy as np
import pytest
import torch

import prunus
from prunus.codegen.onnx import run_onnx
from prunus.data import window_batch
from prunus.models import SHAPES, shape


@pytest.fixture(scope="module")
def smollm2():
    return prunus.models.load("smollm2-135m")


def test_smollm2_loads_from_its_wheel_and_answers(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (30, 9, 3, 576)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = prunus.generate(model, ids, max_new_tokens=2)
    assert tok.decode(out[0, ids.shape[1]:]).strip().startswith("Paris")
    cached = os.path.join(prunus.models.zoo.cache_dir(), "smollm2-135m", "model.safetensors")
    assert os.path.getsize(cached) > 500e6  # converted once to fp32 safetensors


def test_smollm2_captures_and_exports_to_onnx_with_parity(smollm2, tmp_path):
    model, tok = smollm2
    opt = prunus.optimize(model, "simplify_masks", example_inputs=window_batch(tok, 2, 8, seed=1))
    path = opt.export_onnx(str(tmp_path / "smollm2.onnx"))
    (ids,) = window_batch(tok, 1, 48, seed=2)
    got = run_onnx(path, [ids], ["input_ids"])[0]
    want = model(ids).logits.detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_minilm_loads_captures_and_exports(tmp_path):
    model, tok = prunus.models.load("minilm-l6")
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    assert model.config.num_hidden_layers == 6 and model.config.num_attention_heads == 12
    ids = tok(["a first sentence", "and a second one"], padding=True, return_tensors="pt").input_ids
    opt = prunus.optimize(model, "dce, fold_constants, simplify_masks", example_inputs=(ids,))
    path = opt.export_onnx(str(tmp_path / "minilm.onnx"))
    new = tok(["three sentences now", "of different", "lengths, padded to the longest one"], padding=True,
              return_tensors="pt").input_ids
    got = run_onnx(path, [new], ["input_ids"])[0]
    np.testing.assert_allclose(got, model(new).last_hidden_state.detach().numpy(), rtol=1e-3, atol=1e-3)


def test_unknown_names_are_typed_errors():
    with pytest.raises(prunus.models.ModelNotAvailable, match="smollm2-135m"):
        prunus.models.load("gpt-7")
    with pytest.raises(ValueError, match="llama-3-8b"):
        shape("llama-9000")


@pytest.mark.parametrize("name, billions", [("llama-3-8b", 8.03), ("llama-3.2-1b", 1.24), ("qwen2.5-7b", 7.62)])
def test_full_size_shapes_have_the_published_parameter_counts(name, billions):
    model = shape(name, device="meta")  # no memory: only the structure
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - billions) < 0.01
    assert name in SHAPES
