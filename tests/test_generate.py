import pytest
import torch

import prunus
from prunus.models import tiny


@pytest.fixture(scope="module")
def llama_and_opt():
    model = tiny("llama")
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    return model, prunus.optimize(model, "dce, simplify_masks", example_inputs=(ids,)), ids


def test_greedy_matches_hugging_face_generate(llama_and_opt):
    model, opt, ids = llama_and_opt
    want = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=0)
    got, stats = prunus.generate(opt, ids, max_new_tokens=8, return_stats=True)
    assert torch.equal(got, want)
    assert stats["new_tokens"] == 8 and stats["prefill_seconds"] > 0 and stats["decode_tokens_per_second"] > 0
    assert stats["kv_bytes"] == 0  # no cache graphs: every step re-runs the prefix


def test_eos_stops_and_pads_finished_rows(llama_and_opt):
    _, opt, ids = llama_and_opt
    free = prunus.generate(opt, ids, max_new_tokens=6)
    eos = int(free[0, ids.shape[1] + 1])  # row 0 emits this as its second new token
    got = prunus.generate(opt, ids, max_new_tokens=6, eos_token_id=eos)
    assert torch.equal(got[0, ids.shape[1]:ids.shape[1] + 2], free[0, ids.shape[1]:ids.shape[1] + 2])
    assert (got[0, ids.shape[1] + 1:] == eos).all()


def test_bad_arguments(llama_and_opt):
    _, opt, ids = llama_and_opt
    with pytest.raises(prunus.SpecError):
        prunus.generate(opt, ids[0], max_new_tokens=2)
    with pytest.raises(prunus.SpecError):
        prunus.generate(opt, ids, max_new_tokens=0)


def test_a_hugging_face_model_decodes_through_its_cache_and_reports_its_size(llama_and_opt):
    model, opt, ids = llama_and_opt
    got, stats = prunus.generate(model, ids, max_new_tokens=5, return_stats=True)
    assert torch.equal(got, prunus.generate(opt, ids, max_new_tokens=5))
    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    # the peak cache holds every position but the last generated token, for each sequence of the batch
    assert stats["kv_bytes"] == per_token * ids.shape[0] * (ids.shape[1] + 4)
