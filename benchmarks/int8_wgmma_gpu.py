"""The int8 register-operand wgmma kernel (`quant_linear_gluon.int8_gemm_wgmma`) against the Triton path and bf16.

    python benchmarks/int8_wgmma_gpu.py [--sweep-table prunus/kernels/measured_configs.json] [--report FILE]
        [--shapes 14336x4096] [--rows 128,256]

For each shape of `quant_linear_gpu.py` and 64, 128 and 256 rows: every candidate config of the kernel (BLOCK_T
64 / 128 / 256 with its ring depth, 4 or 8 warps, split-K 1 / 2 / 4; warp-specialized with 2 or 3 consumers, one
or two k steps a stage, split-K 1 / 2; BLOCK_T at most twice the rows, split-K only for few row tiles), the op's
path without it (the Triton weight-only tensor-core kernel, `quant_linear_triton.int8_gemm_weight_only`) and bf16
`F.linear`, in the same run. With --sweep-table the fastest config enters the measured table (kernel "int8_wgmma",
group 0: per channel) where it beats the Triton path, and a swept bucket where none does loses its entry.
Times: median of 20 CUDA-graph replays over weight copies exceeding 3x L2, as `quant_linear_gpu.py`. Each shape and
row count runs in a worker process: a config whose launch fails (it leaves the CUDA context unusable) or hangs is
reported and the bucket runs again without it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchmarks.quant_linear_gpu as qb  # noqa: E402
from benchmarks._isolate import announce, measure, run_isolated  # noqa: E402
from benchmarks._report import append  # noqa: E402
from prunus.kernels import quant_linear_gluon as qg  # noqa: E402
from prunus.kernels import quant_linear_triton as qt  # noqa: E402
from prunus.kernels.quant_linear_triton import shape_key  # noqa: E402

WORKER_TIMEOUT = 200  # seconds for one bucket (compiling every candidate included): beyond it, a hang
SMEM = 220 * 1024  # bytes of shared memory a program may take, of the H100's 227 KB


def ws_stages(bt: int, ws: int, ks: int) -> int:
    """The deepest ring (at most 8 stages) a warp-specialized config fits in SMEM with its consumers' partials: a
    stage is ks slots of x [bt, 64] bf16 and words [64, 16] int32."""
    return min(8, (SMEM - (ws - 1) * 64 * bt * 4) // (ks * (bt * 128 + 64 * 64)))


CANDIDATES = [dict(BLOCK_T=bt, STAGES=stages, SPLIT_K=sk, num_warps=nw)
              for bt, nw, sk in itertools.product((64, 128, 256), (4, 8), (1, 2, 4))
              for stages in {64: (6,), 128: (4,), 256: (3,)}[bt]]
CANDIDATES += [dict(BLOCK_T=bt, STAGES=ws_stages(bt, ws, ks), SPLIT_K=sk, WS=ws, WS_K=64 * ks, num_warps=4)
               for bt, ws, ks, sk in itertools.product((64, 128, 256), (2, 3), (1, 2), (1, 2))
               if ws_stages(bt, ws, ks) >= 2 and not (ws == 3 and bt == 256)]  # three 128-register accumulators


def candidates(m: int, x, words, scales) -> list[dict]:
    return [c for c in CANDIDATES if c["BLOCK_T"] <= max(64, 2 * m) and not (c["SPLIT_K"] > 1 and c["BLOCK_T"] * 2 < m)
            and qg.int8_unfit(x, words, scales, c) is None]


def bucket(k: int, n: int, m: int, skip: list) -> dict:
    """Time every candidate but those in `skip` at one shape and row count, the Triton path and bf16 (this
    process: `main` runs it in a worker). Prints `try <config>` before each candidate, so that the parent knows
    which one a launch failure came from: a failed launch leaves the CUDA context unusable, which no `except`
    here can undo."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    case = qb.Case("int8", k, n, gen)
    x = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
    results = []
    for cfg in candidates(m, x, case.quant[0][0].view(torch.int32), case.quant[0][1]):
        if cfg in skip:
            continue
        announce(cfg)
        fn = lambda x, q, s, cfg=cfg: qg.int8_gemm_wgmma(x, q, s, None, cfg)  # noqa: E731
        t, err = measure(case, fn, m)
        results.append((t, err, cfg))
    results.sort(key=lambda r: r[0])
    return dict(results=results, t_op=case.time_quant(lambda x, q, s: qt.int8_gemm_weight_only(x, q, s, None), m),
                t_d=case.time_dense(m))


def run_bucket(k: int, n: int, m: int) -> tuple[dict, list]:
    """`bucket` in worker processes (`_isolate.run_isolated`): its result and the configs left out, with why."""
    out, left_out = run_isolated(lambda skip: [__file__, "--worker", json.dumps([k, n, m, skip])], f"{k}->{n} M={m}",
                                 WORKER_TIMEOUT)
    return json.loads(out.splitlines()[-1][len("result "):]), left_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep-table", default=None, help="measured-config table (JSON) to merge the winners into")
    ap.add_argument("--report", default=None, help="markdown file to append to (default BENCHMARKS.md)")
    ap.add_argument("--shapes", default=None, help="comma-separated KxN shapes to sweep (default: all three)")
    ap.add_argument("--rows", default="64,128,256", help="comma-separated row counts to sweep (default 64,128,256)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # [K, N, M, configs to skip]: one bucket
    args = ap.parse_args()
    if not torch.cuda.is_available() or not qg.available(torch.empty(1, device="cuda")):
        sys.exit("needs a Hopper GPU and Gluon's Hopper API")
    if args.worker:
        print("result", json.dumps(bucket(*json.loads(args.worker))), flush=True)
        return
    rows, winners, swept = [], {}, []
    shapes = [tuple(map(int, sh.split("x"))) for sh in args.shapes.split(",")] if args.shapes else qb.SHAPES
    for k, n in shapes:
        for m in map(int, args.rows.split(",")):
            out, failed = run_bucket(k, n, m)
            t_op, t_d = out["t_op"], out["t_d"]
            t, err, cfg = out["results"][0]
            print(f"{k}->{n} M={m}: bf16 {t_d:.1f}  Triton {t_op:.1f} ({t_d / t_op:.2f}x)  best int8 wgmma {t:.1f} "
                  f"({t_d / t:.2f}x) err {err} {cfg}", flush=True)
            for r in out["results"][1:3]:
                print("     ", f"{r[0]:.1f}", r[1], r[2], flush=True)
            swept.append(shape_key(m, n, k, 0))
            if isinstance(err, float) and err < 1e-2 and t < t_op:
                winners[("int8_wgmma", swept[-1])] = cfg
            rows.append([f"{k}->{n}", m, f"{t_d:.1f}", f"{t_op:.1f} ({t_d / t_op:.2f}x)", f"{t:.1f} ({t_d / t:.2f}x)",
                         ", ".join(f"{key}={v}" for key, v in cfg.items()), f"{err:.1e}" if isinstance(err, float)
                         else err, "; ".join(failed) or "none"])
    if args.sweep_table:  # a bucket swept now keeps an entry only if a config beat the Triton path in this run
        qb.merge_winners(args.sweep_table, torch.cuda.get_device_name(), winners,
                         drop=[("int8_wgmma", key) for key in swept])
    columns = ["shape K->N", "M", "bf16 µs", "Triton path µs (x bf16)", "int8 wgmma µs (x bf16)", "its best config",
               "rel err", "configs left out (launch failure or hang)"]
    append("int8 weights as the wgmma's register operand against the Triton path and bf16", columns, rows,
           notes=("int8 per channel, bf16 activations. The Triton path: the weight-only tensor-core kernel the op "
                  "runs without this one. Every candidate config timed, each shape and row count in a process of "
                  "its own; a config whose launch fails or hangs is left out of that bucket. With --sweep-table the "
                  "best enters the table where it beats the Triton path."), path=args.report)


if __name__ == "__main__":
    main()
