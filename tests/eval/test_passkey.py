import pytest

import prunus
from prunus.eval import passkey
from prunus.eval.passkey import prompt
from tests.eval.fakes import ByteTokenizer, PasskeyOracle, UniformLM

TOK = ByteTokenizer()


def test_oracle_finds_every_key():
    assert passkey(PasskeyOracle(), TOK, context_tokens=300, n=6, seed=1) == 1.0


def test_model_that_never_answers_scores_zero():
    assert passkey(UniformLM(), TOK, context_tokens=300, n=3) == 0.0


@pytest.mark.parametrize("context_tokens", [200, 1000])
def test_prompt_has_about_the_requested_length_and_hides_the_key(context_tokens):
    ids = prompt(TOK, context_tokens, key=12345, depth=0.5)
    assert abs(ids.shape[1] - context_tokens) <= 45  # half a filler line (90 bytes)
    text = TOK.decode(ids[0])
    needle = text.index("The pass key is 12345.")
    assert 0.3 < needle / len(text) < 0.7 and text.endswith("What is the pass key? The pass key is")


def test_bad_arguments():
    with pytest.raises(prunus.SpecError, match="n=0"):
        passkey(UniformLM(), TOK, n=0)
