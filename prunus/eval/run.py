"""Running a model under evaluation, whether an `nn.Module` or a `prunus.OptimizedModel`.

Both are called positionally (`model(ids)`) and return the same structure (e.g. a Hugging Face output
with `.logits`); these helpers pick out the tensor a metric needs and put inputs on the model's device.
"""
from __future__ import annotations

import torch

from prunus.errors import SpecError


def module_of(model) -> torch.nn.Module | None:
    """The module holding the weights: the model itself, or an OptimizedModel's `graph.gm`."""
    module = model if isinstance(model, torch.nn.Module) else getattr(getattr(model, "graph", None), "gm", None)
    return module if isinstance(module, torch.nn.Module) else None


def device_of(model) -> torch.device:
    """The device of the model's first parameter or buffer (CPU when it has none)."""
    module = module_of(model)
    for tensor in (*module.parameters(), *module.buffers()) if module is not None else ():
        return tensor.device
    return torch.device("cpu")


def main_tensor(out, keys: tuple[str, ...] = ("logits", "last_hidden_state")) -> torch.Tensor:
    """The first of `keys` the output has, else its first element (or the output itself, if a tensor)."""
    for key in keys:
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise SpecError(f"cannot find {' or '.join(keys)} in the model's output of type {type(out).__name__}")


def run(model, *inputs: torch.Tensor):
    """`model(*inputs)` without autograd, with the inputs moved to the model's device."""
    device = device_of(model)
    with torch.no_grad():
        return model(*(x.to(device) for x in inputs))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits `[batch, positions, vocab]` of `model(ids)`, as float32 on the model's device."""
    return main_tensor(run(model, ids), ("logits",)).float()
