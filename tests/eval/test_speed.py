import pytest
import torch

import prunus
from prunus.eval import speed

KEYS = {"prefill_seconds", "decode_tokens_per_second", "peak_memory_bytes", "memory_method", "weight_bytes",
        "device", "batch", "prompt_tokens", "new_tokens"}


@pytest.mark.parametrize("optimized", [False, True])
def test_speed_reports_positive_figures(tiny_models, cleaned, optimized):
    model, x = tiny_models("llama")
    got = speed(cleaned("llama") if optimized else model, x, new_tokens=4, repeat=3)
    assert set(got) == KEYS
    assert got["prefill_seconds"] > 0 and got["decode_tokens_per_second"] > 0
    assert got["peak_memory_bytes"] >= 0 and got["weight_bytes"] > 0
    assert got["memory_method"] in ("cpu_peak_rss", "cpu_max_rss_growth") and got["device"] == "cpu"
    assert (got["batch"], got["prompt_tokens"], got["new_tokens"]) == (*x[0].shape, 4)


def test_speed_rejects_non_token_inputs(tiny_models):
    model, _ = tiny_models("vit")
    with pytest.raises(prunus.SpecError, match="token ids"):
        speed(model, torch.randn(1, 3, 32, 32))


def test_speed_of_an_encoder_is_prefill_only(tiny_models):
    model, x = tiny_models("bert")
    got = speed(model, x, new_tokens=0, warmup=0, repeat=1)
    assert got["prefill_seconds"] > 0 and got["decode_tokens_per_second"] is None
    with pytest.raises(prunus.SpecError, match="logits"):
        speed(model, x, new_tokens=1)
