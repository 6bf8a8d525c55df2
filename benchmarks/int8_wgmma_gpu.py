"""The int8 register-operand wgmma kernel (`quant_linear_gluon.int8_gemm_wgmma`) against the Triton path and bf16.

    python benchmarks/int8_wgmma_gpu.py [--sweep-table prunus/kernels/measured_configs.json] [--report FILE]

For each shape of `quant_linear_gpu.py` and 64, 128 and 256 rows: every candidate config of the kernel (BLOCK_T
64 / 128 / 256 with its ring depth, 4 or 8 warps, split-K 1 / 2 / 4; BLOCK_T at most twice the rows, split-K
only for few row tiles), the op's path without it (the Triton weight-only tensor-core kernel,
`quant_linear_triton.int8_gemm_weight_only`) and bf16 `F.linear`, in the same run. With --sweep-table the fastest
config enters the measured table (kernel "int8_wgmma", group 0: per channel) where it beats the Triton path.
Times: median of 20 CUDA-graph replays over weight copies exceeding 3x L2, as `quant_linear_gpu.py`.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchmarks.quant_linear_gpu as qb  # noqa: E402
from benchmarks._report import append  # noqa: E402
from prunus.kernels import quant_linear_gluon as qg  # noqa: E402
from prunus.kernels import quant_linear_triton as qt  # noqa: E402
from prunus.kernels.quant_linear_triton import shape_key  # noqa: E402

CANDIDATES = [dict(BLOCK_T=bt, STAGES=stages, SPLIT_K=sk, num_warps=nw)
              for bt, nw, sk in itertools.product((64, 128, 256), (4, 8), (1, 2, 4))
              for stages in {64: (6,), 128: (4,), 256: (3,)}[bt]]


def candidates(m: int, x, words, scales) -> list[dict]:
    return [c for c in CANDIDATES if c["BLOCK_T"] <= max(64, 2 * m) and not (c["SPLIT_K"] > 1 and c["BLOCK_T"] * 2 < m)
            and qg.int8_unfit(x, words, scales, c) is None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep-table", default=None, help="measured-config table (JSON) to merge the winners into")
    ap.add_argument("--report", default=None, help="markdown file to append to (default BENCHMARKS.md)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not qg.available(torch.empty(1, device="cuda")):
        sys.exit("needs a Hopper GPU and Gluon's Hopper API")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, winners = [], {}
    for k, n in qb.SHAPES:
        case = qb.Case("int8", k, n, gen)
        for m in (64, 128, 256):
            x = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
            results = []
            for cfg in candidates(m, x, case.quant[0][0].view(torch.int32), case.quant[0][1]):
                fn = lambda x, q, s, cfg=cfg: qg.int8_gemm_wgmma(x, q, s, None, cfg)  # noqa: E731
                try:
                    t, err = case.time_quant(fn, m), case.error(fn, m)
                except Exception as exc:  # out of shared memory or registers: skip the config
                    t, err = float("inf"), type(exc).__name__
                results.append((t, err, cfg))
            results.sort(key=lambda r: r[0])
            t_op = case.time_quant(lambda x, q, s: qt.int8_gemm_weight_only(x, q, s, None), m)
            t_d = case.time_dense(m)
            t, err, cfg = results[0]
            print(f"{k}->{n} M={m}: bf16 {t_d:.1f}  Triton {t_op:.1f} ({t_d / t_op:.2f}x)  best int8 wgmma {t:.1f} "
                  f"({t_d / t:.2f}x) err {err} {cfg}", flush=True)
            for r in results[1:3]:
                print("     ", f"{r[0]:.1f}", r[1], r[2], flush=True)
            if isinstance(err, float) and err < 1e-2 and t < t_op:
                winners[("int8_wgmma", shape_key(m, n, k, 0))] = cfg
            rows.append([f"{k}->{n}", m, f"{t_d:.1f}", f"{t_op:.1f} ({t_d / t_op:.2f}x)", f"{t:.1f} ({t_d / t:.2f}x)",
                         ", ".join(f"{key}={v}" for key, v in cfg.items()), f"{err:.1e}" if isinstance(err, float)
                         else err])
        del case
    if args.sweep_table:
        qb.merge_winners(args.sweep_table, torch.cuda.get_device_name(), winners)
    columns = ["shape K->N", "M", "bf16 µs", "Triton path µs (x bf16)", "int8 wgmma µs (x bf16)", "its best config",
               "rel err"]
    append("int8 weights as the wgmma's register operand against the Triton path and bf16", columns, rows,
           notes=("int8 per channel, bf16 activations. The Triton path: the weight-only tensor-core kernel the op "
                  "runs without this one. Every candidate config timed; with --sweep-table the best enters the "
                  "table where it beats the Triton path."), path=args.report)


if __name__ == "__main__":
    main()
