"""The pass manager: runs passes in order, times them, records figures, re-checks shapes and verifies.

For every pass: parameters and FLOPs per token before/after, a lint and shape re-propagation (inside
`Graph.recompile`), then verification. An exact pass must reproduce the previous outputs within float
tolerance or the manager raises `VerificationError`; a lossy pass records fidelity against the original
model and raises only when one of its budget params (max_kl, min_top1, min_sqnr_db) is violated.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from prunus.errors import PassError, PrunusError, SpecError, VerificationError
from prunus.ir.printer import to_dict, to_text
from prunus.passes.base import Pass, PassContext
from prunus.passes.kv.cache import kv_bytes_per_token
from prunus.passes.verify import fidelity_metrics, max_abs_error

# Exact passes may reorder float arithmetic (e.g. fused attention instead of an explicit mask), so the
# bound is relative to the output scale rather than bitwise.
EXACT_RTOL = 1e-4


@dataclass
class PassRecord:
    """One row of `opt.report`."""

    name: str
    params: dict
    spec: str
    kind: str
    seconds: float
    modified: bool
    params_before: int
    params_after: int
    flops_before: float
    flops_after: float
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    kv_bytes_before: int | None = None
    kv_bytes_after: int | None = None
    verification: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def __getitem__(self, key):
        return getattr(self, key)

    def to_dict(self) -> dict:
        return asdict(self)


def tokens_of(graph) -> int:
    """Tokens in the example: batch x sequence of the first input with a sequence dim, else batch."""
    for info, x in zip(graph.inputs, graph.example_inputs):
        if "seq" in info.dynamic.values():
            return int(x.shape[0] * x.shape[1])
    return int(graph.example_inputs[0].shape[0]) if graph.example_inputs else 1


def measure(graph, flat_inputs) -> tuple[list, float]:
    """Run the graph once, returning its flat outputs and matmul/attention FLOPs per token."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        outs = graph.run_flat(flat_inputs)
    return outs, counter.get_total_flops() / tokens_of(graph)


def _check_budget(p: Pass, metrics: dict) -> dict:
    budgets = {}
    for key, metric, ok in (("max_kl", "kl", lambda v, b: v <= b), ("min_top1", "top1", lambda v, b: v >= b),
                            ("min_sqnr_db", "sqnr_db", lambda v, b: v >= b)):
        bound = getattr(p.params, key, None)
        if bound is None:
            continue
        budgets[key] = bound
        if metric in metrics and not ok(metrics[metric], bound):
            raise VerificationError(p.name, metric, metrics[metric], f"{key}={bound}")
    return budgets


class PassManager:
    def __init__(self, passes: list[Pass], *, verify: bool = True, dump_dir: str | None = None,
                 calibration: list | None = None, progress=None):
        self.passes = passes
        self.verify = verify
        self.dump_dir = dump_dir
        self.calibration = calibration
        self.progress = progress
        self.snapshots: list[tuple[str, dict]] = []  # (label, IR as a dict) after capture and every pass

    def _dump(self, graph, index: int, label: str) -> None:
        snapshot = to_dict(graph)
        self.snapshots.append((f"{index:02d}_{label}", snapshot))
        if not self.dump_dir:
            return
        os.makedirs(self.dump_dir, exist_ok=True)
        stem = os.path.join(self.dump_dir, f"{index:02d}_{label}")
        with open(stem + ".txt", "w") as f:
            f.write(to_text(graph))
        with open(stem + ".json", "w") as f:
            json.dump(snapshot, f, indent=1, default=str)

    def run(self, graph) -> list[PassRecord]:
        ctx = PassContext(example_inputs=list(graph.example_inputs), calibration=self.calibration)
        original, flops = measure(graph, ctx.example_inputs)
        previous = original
        self._dump(graph, 0, "captured")
        records = []
        for i, p in enumerate(self.passes, start=1):
            missing = [a for a in p.requires if a not in _known_analyses()]
            if missing:
                raise PassError(p.name, f"requires unknown analyses {missing}")
            if p.needs_calibration and not ctx.calibration:
                raise SpecError("this pass needs calibration data; pass calibration=...", pass_name=p.name)
            params_before, bytes_before = graph.num_parameters(), graph.weight_bytes()
            kv_before = kv_bytes_per_token(graph)
            t0 = time.perf_counter()
            try:
                result = p.run(graph, ctx)
            except PrunusError:
                raise
            except Exception as e:  # noqa: BLE001 - a bug or unsupported graph: name the pass
                raise PassError(p.name, f"{type(e).__name__}: {e}") from e
            if result.modified:
                graph.invalidate(p.preserves)
                graph.recompile(p.name)
            seconds = time.perf_counter() - t0
            outs, flops_after = measure(graph, ctx.example_inputs)
            verification = {}
            if self.verify:
                verification = self._verify(p, previous, original, outs)
            graph.history.append({"name": p.name, "params": p.param_dict(), "spec": p.spec()})
            records.append(PassRecord(
                name=p.name, params=p.param_dict(), spec=p.spec(), kind=p.kind, seconds=seconds,
                modified=result.modified, params_before=params_before, params_after=graph.num_parameters(),
                weight_bytes_before=bytes_before, weight_bytes_after=graph.weight_bytes(),
                flops_before=flops, flops_after=flops_after, kv_bytes_before=kv_before,
                kv_bytes_after=kv_bytes_per_token(graph), verification=verification, notes=result.notes))
            previous, flops = outs, flops_after
            self._dump(graph, i, p.name)
            if self.progress is not None:
                self.progress(i, len(self.passes), p.name)
        if self.dump_dir:
            with open(os.path.join(self.dump_dir, "report.json"), "w") as f:
                json.dump([r.to_dict() for r in records], f, indent=1, default=str)
        return records

    def _verify(self, p: Pass, previous: list, original: list, outs: list) -> dict:
        if p.kind == "exact":
            err, scale = max_abs_error(previous, outs)
            bound = EXACT_RTOL * max(1.0, scale)
            if not err <= bound:
                raise VerificationError(p.name, "max_abs_error", err, f"<= {bound:.3g} (exact pass)")
            return {"max_abs_error": err, "budget": {"max_abs_error": bound}}
        metrics = fidelity_metrics(original, outs)
        metrics["budget"] = _check_budget(p, metrics)
        return metrics


def _known_analyses():
    from prunus.ir.analyses import ANALYSES

    return ANALYSES
