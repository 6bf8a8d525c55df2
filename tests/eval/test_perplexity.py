import math

import pytest

import prunus
from prunus.data import default_corpus
from prunus.eval import long_ppl, perplexity
from tests.eval.fakes import VOCAB, ByteTokenizer, LastPosition, SuccessorLM, UniformLM

TOK = ByteTokenizer()
ALPHABET = "abcdefghijklmnopqrstuvwxyz{"  # each byte followed by its successor, except at "{" -> "a"


def test_uniform_model_has_perplexity_vocab():
    assert math.isclose(perplexity(UniformLM(), TOK, default_corpus(), seq_len=64, max_tokens=300), VOCAB,
                        rel_tol=1e-9)


def test_successor_model_has_the_computed_perplexity():
    text = ALPHABET[:-1] * 20  # 520 bytes: every transition but "z" -> "a" is b -> b + 1
    scale = 10.0
    nll_hit, nll_miss = math.log1p(255 * math.exp(-scale)), math.log(math.exp(scale) + 255)
    # windows of 26 bytes start at "a" and end at "z": 25 predictions, all hits
    assert math.isclose(perplexity(SuccessorLM(scale), TOK, text, seq_len=26, max_tokens=520), math.exp(nll_hit),
                        rel_tol=1e-9)
    # one 520-byte document: 19 of its 519 predictions are the "z" -> "a" misses
    expected = math.exp((500 * nll_hit + 19 * nll_miss) / 519)
    assert math.isclose(long_ppl(SuccessorLM(scale), TOK, text, max_tokens=520), expected, rel_tol=1e-9)
    assert math.isclose(perplexity(SuccessorLM(50.0), TOK, text, seq_len=26, max_tokens=520), 1.0, abs_tol=1e-12)


def test_long_ppl_equals_one_window_perplexity(tiny_models, cleaned):
    model, _ = tiny_models("llama")
    text = default_corpus()[:160]
    full = perplexity(model, TOK, text, seq_len=160, max_tokens=160)
    assert full > 1
    assert math.isclose(long_ppl(model, TOK, text, max_tokens=160), full, rel_tol=1e-4)  # KV cache, token by token
    opt = cleaned("llama")
    assert math.isclose(long_ppl(opt, TOK, text, max_tokens=160), full, rel_tol=1e-4)  # prefix re-runs
    assert math.isclose(long_ppl(opt, TOK, text, max_tokens=160, chunk=7), full, rel_tol=1e-4)
    assert math.isclose(perplexity(opt, TOK, text, seq_len=160, max_tokens=160), full, rel_tol=1e-4)


def test_windows_are_independent_and_the_tail_is_dropped():
    text = "ab" * 100
    model = SuccessorLM(10.0)
    # 200 bytes in windows of 64: three windows, the last 8 bytes are not scored
    assert perplexity(model, TOK, text, seq_len=64, max_tokens=1000) == perplexity(model, TOK, text[:192], seq_len=64)


def test_token_dropping_model_streams_one_token_at_a_time():
    model, text = LastPosition(SuccessorLM(10.0)), ALPHABET * 4
    with pytest.raises(prunus.SpecError, match="use long_ppl"):
        perplexity(model, TOK, text, seq_len=16, max_tokens=64)
    with pytest.raises(prunus.SpecError, match="chunk=1"):
        long_ppl(model, TOK, text, max_tokens=64)
    assert long_ppl(model, TOK, text, max_tokens=64, chunk=1) == long_ppl(SuccessorLM(10.0), TOK, text, max_tokens=64)


@pytest.mark.parametrize("kwargs, match", [(dict(seq_len=1), "seq_len must be >= 2"),
                                           (dict(seq_len=64, max_tokens=32), "max_tokens=32"),
                                           (dict(text="short", seq_len=64), "fewer than")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(prunus.SpecError, match=match):
        perplexity(UniformLM(), TOK, **kwargs)


def test_long_ppl_bad_chunk():
    with pytest.raises(prunus.SpecError, match="chunk"):
        long_ppl(UniformLM(), TOK, "some text", chunk=0)


def test_smollm2_perplexity_on_default_corpus():
    """ENVIRONMENT.md: 14.7 for the first 4096 tokens of pydoc_data.topics in 512-token windows."""
    model, tok = prunus.models.load("smollm2-135m")
    assert 10 < perplexity(model, tok, seq_len=512, max_tokens=4096) < 20
