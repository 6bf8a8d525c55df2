"""Latency, decode throughput and peak memory of one model on its own device (CPU or CUDA).

Each measurement is warmed up, repeated, and reported as the median:
- `prefill_seconds`: one forward of `inputs`, e.g. the whole prompt.
- `decode_tokens_per_second`: greedy steps after that prompt through the model's decoder
  (`prunus.eval.decode`: its KV cache, or prefix re-runs for a model without one), tokens of all
  sequences in the batch counted; None with `new_tokens=0`, for encoders.
- `peak_memory_bytes`: the most memory the measured calls held beyond what was allocated before them
  (activations, KV cache, workspace; weights and inputs excluded). CUDA: `torch.cuda.max_memory_allocated`
  minus `memory_allocated` at the start. CPU: the process's peak resident set size (VmHWM, reset through
  /proc/self/clear_refs) minus its resident size at the start; approximate, since the C allocator keeps
  freed pages (where the peak cannot be reset, growth above the lifetime peak, `cpu_max_rss_growth`), and
  the prefill warmup runs before the window so that memory-mapped weights, paged in on first use, stay out.
  `memory_method` names the one used. `weight_bytes` adds the parameters and buffers.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from prunus.errors import SpecError
from prunus.eval.decode import decoder
from prunus.eval.run import device_of, module_of, run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _max_rss_bytes() -> int:
    """The process's lifetime peak RSS (getrusage reports KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class _PeakMemory:
    """Peak bytes in use within the `with` block beyond those in use at its start."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, 0
        self.method = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = _status_bytes("VmRSS")
        except OSError:  # no resettable peak: only growth above the lifetime peak shows
            self.method, self.start = "cpu_max_rss_growth", _max_rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_bytes("VmHWM") if self.method == "cpu_peak_rss" else _max_rss_bytes()
        self.bytes = max(0, peak - self.start)


def _weight_bytes(model) -> int:
    module = module_of(model)
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def speed(model, inputs, new_tokens: int = 16, warmup: int = 1, repeat: int = 5) -> dict:
    """Median prefill latency, decode throughput and peak memory of `model` at `inputs` (token ids first).

    Returns `prefill_seconds`, `decode_tokens_per_second`, `peak_memory_bytes`, `memory_method`,
    `weight_bytes`, `device`, `batch`, `prompt_tokens` and `new_tokens`. `new_tokens=0` times the forward
    alone (encoders have nothing to decode).
    """
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not inputs or inputs[0].dim() != 2 or inputs[0].is_floating_point():
        raise SpecError("speed needs token ids [batch, seq] as the first input")
    if new_tokens < 0 or warmup < 0 or repeat < 1:
        raise SpecError(f"speed needs new_tokens >= 0, warmup >= 0, repeat >= 1; got {new_tokens}, {warmup}, "
                        f"{repeat}")
    device = device_of(model)
    ids = inputs[0].to(device)

    def decode():
        dec = decoder(model)
        token = dec.feed(ids)[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = dec.feed(token)[:, -1:].argmax(-1)
        _sync(device)
        return time.perf_counter() - start

    for _ in range(warmup):  # before the memory window: memory-mapped weights page in on first use
        run(model, *inputs)
    with _PeakMemory(device) as memory:
        prefill = _median_seconds(lambda: run(model, *inputs), device, repeat)
        decode_rate = None
        if new_tokens:
            for _ in range(warmup):
                decode()
            decode_rate = ids.shape[0] * new_tokens / statistics.median(decode() for _ in range(repeat))
    return {"prefill_seconds": prefill, "decode_tokens_per_second": decode_rate,
            "peak_memory_bytes": memory.bytes, "memory_method": memory.method,
            "weight_bytes": _weight_bytes(model), "device": str(device), "batch": ids.shape[0],
            "prompt_tokens": ids.shape[1], "new_tokens": new_tokens}
