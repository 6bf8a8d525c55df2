import pytest
import torch

import prunus
from prunus.eval import decoder, greedy
from prunus.eval.decode import CacheDecoder, PrefixDecoder


def test_decoder_kinds(tiny_models, cleaned):
    model, _ = tiny_models("llama")
    assert isinstance(decoder(model), CacheDecoder) and isinstance(decoder(cleaned("llama")), PrefixDecoder)


def test_greedy_agrees_between_cache_and_prefix_decoding(tiny_models, cleaned):
    model, x = tiny_models("llama")
    expected = model.generate(x[0], max_new_tokens=6, do_sample=False, min_new_tokens=6,
                              attention_mask=torch.ones_like(x[0]))
    assert torch.equal(greedy(model, x[0], 6), expected)
    assert torch.equal(greedy(cleaned("llama"), x[0], 6), expected)


def test_greedy_stops_at_eos(tiny_models):
    model, x = tiny_models("llama")
    first = greedy(model, x[0][:1], 1)[0, -1].item()
    assert greedy(model, x[0][:1], 5, eos_token_id=first).shape[1] == x[0].shape[1] + 1


def test_greedy_pads_finished_rows_like_generate(cleaned, tiny_models):
    _, x = tiny_models("llama")
    free = greedy(cleaned("llama"), x[0], 6)
    eos = int(free[0, x[0].shape[1] + 1])
    got = greedy(cleaned("llama"), x[0], 6, eos_token_id=eos)
    assert torch.equal(got, prunus.generate(cleaned("llama"), x[0], 6, eos_token_id=eos))
    with pytest.raises(prunus.SpecError, match="at least 1"):
        greedy(cleaned("llama"), x[0], 0)
