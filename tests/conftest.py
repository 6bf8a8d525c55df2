import os

# Triton kernels run on the CPU only in the interpreter, which must be chosen before kernels are defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

import prunus  # noqa: E402
from prunus.models import ARCHS, example_inputs, tiny  # noqa: E402

torch.set_num_threads(1)  # two xdist workers share two cores

CLEANUP = "dce, fold_constants, simplify_masks"

# where the Triton kernels run: the interpreter on the CPU (the default here), compiled on CUDA otherwise
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if CUDA else "cpu"
needs_kernels = pytest.mark.skipif(not (INTERPRET or CUDA), reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (and TRITON_INTERPRET unset or 0)")
SMALL_ATTENTION = dict(BLOCK_N=16, num_warps=4, num_stages=1)  # decode-attention kernels at interpreter sizes


def main_output(out):
    """The tensor a test compares: logits, else the last hidden state, else the first output."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.fixture(scope="session")
def tiny_models():
    """arch -> (model, example inputs), built once per worker."""
    cache = {}

    def get(arch):
        if arch not in cache:
            model = tiny(arch)
            cache[arch] = (model, example_inputs(model))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def cleaned(tiny_models):
    """arch -> OptimizedModel after the clean-up pipeline, built once per worker."""
    cache = {}

    def get(arch):
        if arch not in cache:
            model, x = tiny_models(arch)
            cache[arch] = prunus.optimize(model, CLEANUP, example_inputs=x)
        return cache[arch]

    return get


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param
