import pytest
import torch

import prunus
from prunus.data import Calibration, calibration_windows, corpus_passages, default_corpus, token_ids
from tests.eval.fakes import ByteTokenizer

TOK = ByteTokenizer()


def test_default_corpus_is_the_sorted_pydoc_topics():
    from pydoc_data.topics import topics

    text = default_corpus()
    assert text.startswith(topics[sorted(topics)[0]]) and text.endswith(topics[sorted(topics)[-1]])
    assert len(text) == sum(len(v) for v in topics.values()) + len(topics) - 1


def test_calibration_windows_are_seeded_slices():
    windows = calibration_windows(TOK, n=4, seq_len=32, seed=3)
    assert len(windows) == 4 and all(len(w) == 1 and w[0].shape == (1, 32) for w in windows)
    again = calibration_windows(TOK, n=4, seq_len=32, seed=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(windows, again))
    other = calibration_windows(TOK, n=4, seq_len=32, seed=4)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(windows, other))
    corpus = default_corpus().encode()
    assert all(bytes(w[0][0].tolist()) in corpus for w in windows)
    assert torch.equal(calibration_windows(TOK, 2, 8, text="abcdefgh")[1][0], token_ids(TOK, "abcdefgh")[None])


def test_calibration_feeds_optimize(tiny_models):
    model, x = tiny_models("llama")
    calib = Calibration.from_corpus(TOK, n=2, seq_len=16)
    assert len(calib.samples) == 2
    prunus.optimize(model, "dce", example_inputs=x, calibration=calib)


def test_bad_arguments():
    with pytest.raises(prunus.SpecError, match="fewer than one window"):
        calibration_windows(TOK, n=1, seq_len=100, text="short")
    with pytest.raises(prunus.SpecError, match="n >= 1"):
        calibration_windows(TOK, n=0, seq_len=8)
    with pytest.raises(prunus.SpecError, match="passages"):
        corpus_passages(10_000)
