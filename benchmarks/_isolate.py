"""Run a benchmark's bucket of candidate configs in worker processes, leaving out a config that kills its worker.

A Hopper kernel that faults (`cudaErrorLaunchFailure`) leaves the process's CUDA context unusable, which no
`except` can undo, and one that hangs never returns. So a sweep runs each bucket (a shape and row count) in a
worker that prints `try <config as JSON>` before each candidate. When a worker dies or runs past its time, the
last config it tried is left out and the bucket runs again without it.
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Callable

TRY = "try "


def announce(config: dict) -> None:
    """In a worker: name the candidate about to run (before it compiles or launches)."""
    print(TRY + json.dumps(config), flush=True)


def measure(case, fn, m: int) -> tuple:
    """(µs, relative error) of candidate `fn` on a `quant_linear_gpu.Case` at m rows, or (inf, the exception's
    name) where it cannot run (out of shared memory or registers, a bad config). A lost CUDA context is raised on:
    the worker dies and the parent leaves the config out."""
    import torch

    try:
        t, err = case.time_quant(fn, m), case.error(fn, m)
        torch.cuda.synchronize()
        return t, err
    except Exception as exc:
        if isinstance(exc, torch.AcceleratorError):
            raise
        return float("inf"), type(exc).__name__


def run_isolated(argv: Callable[[list], list], label: str, timeout: float, attempts: int = 8) -> tuple[str, list]:
    """Run `python *argv(skip)` until it exits 0, skip growing by the config each failed run tried last. Returns the
    successful run's stdout and the configs left out, each as "KEY=V, ...: launch failure" (or ": hang")."""
    skip, left_out = [], []
    while True:
        try:
            done = subprocess.run([sys.executable, *argv(skip)], capture_output=True, text=True, timeout=timeout)
            if done.returncode == 0:
                return done.stdout, left_out
            out, err, why = done.stdout, done.stderr, "launch failure"
        except subprocess.TimeoutExpired as exc:  # run() has killed the worker
            out, err, why = [t.decode() if isinstance(t, bytes) else (t or "") for t in (exc.stdout, exc.stderr)] + [
                "hang"]
        tried = [line[len(TRY):] for line in out.splitlines() if line.startswith(TRY)]
        if not tried or len(skip) >= attempts:
            sys.exit(f"{label}: the worker failed ({why}) {'before any config' if not tried else 'again'}:\n"
                     f"{out[-2000:]}\n{err[-3000:]}")
        skip.append(json.loads(tried[-1]))
        left_out.append(f"{', '.join(f'{key}={v}' for key, v in skip[-1].items())}: {why}")
        print(f"{label}: {why} with {tried[-1]}; again without it", flush=True)
