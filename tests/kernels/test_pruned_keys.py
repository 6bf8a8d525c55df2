"""ThinK's attention over pruned key channels: the Triton kernels (CPU: TRITON_INTERPRET=1, small shapes, fp32;
CUDA: bf16, llama shapes) against the reference, output and per-entry probabilities."""
import pytest
import torch

from prunus.passes.kv.pruned_keys import decode_attention_pruned_keys_reference as reference
from tests.conftest import CUDA, DEVICE, needs_kernels, needs_cuda, SMALL_ATTENTION as SMALL


def inputs(b, h, hk, t, n_p, n_r, d, kept, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    channels = torch.rand(b, hk, d, generator=g).argsort(-1)[..., :kept].sort(-1).values
    return (rnd(b, h, t, d), channels, rnd(b, hk, n_p, kept), rnd(b, hk, n_r, d), rnd(b, hk, n_p + n_r, d),
            rnd(b, hk, t, d), rnd(b, hk, t, d))


@pytest.fixture(scope="module")
def pk():
    pytest.importorskip("triton")
    from prunus.kernels import pruned_keys_triton

    return pruned_keys_triton


CASES = [  # b, h, hk, t, n_p, n_r, d, kept, splits
    (1, 4, 2, 1, 40, 8, 16, 8, 2),  # a split boundary inside the pruned entries, the recent ones in the last
    (2, 4, 2, 1, 20, 13, 16, 12, 2),  # the boundary between pruned and recent inside a split; kept not a power of 2
    (1, 8, 2, 3, 24, 4, 32, 16, None),  # t = 3 new tokens (causal), group 4
    (1, 2, 1, 1, 0, 9, 16, 8, None),  # nothing pruned yet
    (1, 4, 2, 2, 17, 0, 16, 4, 3),  # no recent window; kept below the 16 a dot needs
]


@needs_kernels
@pytest.mark.parametrize("raw_scores", [True, False], ids=["stored-scores", "keys-read-again"])
@pytest.mark.parametrize("b, h, hk, t, n_p, n_r, d, kept, splits", CASES)
def test_kernel_matches_reference(pk, monkeypatch, b, h, hk, t, n_p, n_r, d, kept, splits, raw_scores):
    from prunus.kernels import decode_attention_triton as dat

    x = [a.to(DEVICE) for a in inputs(b, h, hk, t, n_p, n_r, d, kept, seed=n_p + n_r)]
    monkeypatch.setattr(dat, "_scores_kernel" if raw_scores else "_probs_kernel", None)  # the other path alone
    out, probs = pk.decode_attention_pruned_keys(*x, 0.3, config=SMALL, num_splits=splits, raw_scores=raw_scores)
    ref_out, ref_probs = reference(*[a.cpu() for a in x], 0.3)
    assert out.shape == (b, h, t, d) and probs.shape == (b, hk, n_p + n_r + t)
    torch.testing.assert_close(out.cpu(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs.cpu(), ref_probs, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_cuda_op_bf16():
    x = inputs(2, 32, 8, 1, 2000, 32, 128, 64, dtype=torch.bfloat16)
    out, probs = torch.ops.prunus.decode_attention_pruned_keys(*[a.cuda() for a in x], 128 ** -0.5)
    ref_out, ref_probs = reference(*[a.float() if a.is_floating_point() else a for a in x], 128 ** -0.5)
    assert out.dtype == torch.bfloat16
    assert ((out.float().cpu() - ref_out).norm() / ref_out.norm()).item() < 1e-2
    assert ((probs.cpu() - ref_probs).norm() / ref_probs.norm()).item() < 1e-2
