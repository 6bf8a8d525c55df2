import copy
import math

import pytest
import torch

import prunus
from prunus.eval import embedding_similarity, fidelity
from tests.eval.fakes import ByteTokenizer, Shifted


def test_model_against_itself(tiny_models, cleaned):
    model, x = tiny_models("llama")
    assert fidelity(model, model, x) == {"top1": 1.0, "kl": 0.0, "sqnr_db": math.inf}
    got = fidelity(model, cleaned("llama"), x[0])  # a tensor alone is one positional input
    assert got["top1"] == 1.0 and got["kl"] < 1e-9 and got["sqnr_db"] > 80


def test_known_perturbations(tiny_models):
    model, x = tiny_models("llama")
    ref = model(*x).logits.double()
    # a constant shift leaves the softmax unchanged: only the SQNR sees it
    shifted = fidelity(model, Shifted(model, shift=0.5), x)
    assert shifted["top1"] == 1.0 and shifted["kl"] == pytest.approx(0.0, abs=1e-9)
    assert shifted["sqnr_db"] == pytest.approx(10 * math.log10(ref.pow(2).sum().item() / (ref.numel() * 0.25)),
                                               rel=1e-6)
    # negated logits: the top token becomes the bottom one, and the error is twice the signal
    negated = fidelity(model, Shifted(model, scale=-1.0), x)
    assert negated["top1"] == 0.0 and negated["kl"] > 0
    assert negated["sqnr_db"] == pytest.approx(-20 * math.log10(2), rel=1e-9)


def test_fidelity_needs_inputs(tiny_models):
    model, _ = tiny_models("llama")
    with pytest.raises(prunus.SpecError, match="at least one input"):
        fidelity(model, model, ())


def test_embedding_similarity(tiny_models):
    model, _ = tiny_models("bert")
    tok = ByteTokenizer()
    assert embedding_similarity(model, model, tok) == pytest.approx(1.0, abs=1e-6)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.encoder.layer[0].parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
    sim = embedding_similarity(model, noisy, tok, texts=["The sky is blue.", "Here we go."])
    assert 0 < sim < 0.9999


def test_minilm_embeddings_survive_cleanup():
    model, tok = prunus.models.load("minilm-l6")
    ids = tok("The grass is green.", return_tensors="pt").input_ids
    opt = prunus.optimize(model, "dce", example_inputs=(ids,))
    assert embedding_similarity(model, opt, tok, texts=None) == pytest.approx(1.0, abs=1e-5)
