"""Launch one quantized-linear kernel a few times at a fixed config, for a profiler (Nsight Compute) and to leave
its compiled PTX / SASS in Triton's cache for reading.

    ncu -k regex:_int4_gemv --launch-skip 2 --launch-count 1 --section SpeedOfLight --section WarpStateStats \\
        python benchmarks/quant_linear_profile.py --kernel gemv --shape 4096x14336 \\
        --config BLOCK_N=8,GROUPS=8,SPLIT_K=1 [--dump DIR]

--kernel gemv (int4 GEMV), gemm (int4 tensor-core kernel), int8_gemv, or the Gluon kernels of
`prunus.kernels.quant_linear_gluon` (sm_90): wgmma (the wgmma GEMM; a config with BLOCK_T runs the register-operand
kernel `_int4_wgmma_rs_kernel`) or gemv_mma (the tensor-core GEMV; with STAGES its TMA variant); --rows M (default 1);
--config the kernel's block sizes plus num_warps / num_stages. --dump copies the kernel's .ptx / .ttgir / .cubin from
Triton's cache into DIR and writes its SASS (cuobjdump) there.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prunus.kernels as pk  # noqa: E402
from prunus.kernels import quant_linear_gluon as qg  # noqa: E402
from prunus.kernels import quant_linear_triton as qt  # noqa: E402

KERNELS = {"gemv": ("_int4_gemv_kernel", qt.int4_gemv), "gemm": ("_int4_gemm_kernel", qt.int4_gemm),
           "int8_gemv": ("_int8_gemv_kernel", qt.int8_gemv), "wgmma": ("_int4_wgmma_kernel", qg.int4_gemm_wgmma),
           "gemv_mma": ("_int4_gemv_mma_kernel", qg.int4_gemv_mma)}


def kernel_name(kernel: str, config: dict) -> str:
    """The name the launch compiles under (ncu's -k, the cache files of --dump)."""
    if kernel == "wgmma" and "BLOCK_T" in config:
        return "_int4_wgmma_rs_kernel"
    if kernel == "gemv_mma" and config.get("STAGES", 0) > 0:
        return "_int4_gemv_tma_kernel"
    return KERNELS[kernel][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", choices=sorted(KERNELS), default="gemv")
    ap.add_argument("--shape", default="4096x14336", help="K x N (in x out features)")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--config", required=True, help="e.g. BLOCK_N=8,GROUPS=8,SPLIT_K=1,num_warps=4")
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--dump", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    k, n = (int(v) for v in args.shape.split("x"))
    config = {key: int(value) for key, value in (item.split("=") for item in args.config.split(","))}
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    launch = KERNELS[args.kernel][1]
    name = kernel_name(args.kernel, config)
    if args.kernel == "int8_gemv":
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda", generator=gen)
        s = torch.rand(n, device="cuda", generator=gen).to(torch.bfloat16)
        run = lambda: launch(x, q, s, None, config)  # noqa: E731
    else:
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda", generator=gen)
        s = torch.rand(n, k // args.group, device="cuda", generator=gen).to(torch.bfloat16)
        z = torch.randint(0, 16, (n, k // args.group), dtype=torch.uint8, device="cuda", generator=gen)
        weights = (pk.pack_int4(q), s, z)
        if args.kernel in ("wgmma", "gemv_mma"):  # the Gluon kernels take the words as int32, as the op passes them
            weights = (weights[0].view(torch.int32), s, z)
            refused = (qg.unfit if args.kernel == "wgmma" else qg.gemv_unfit)(x, *weights, args.group, config)
            if refused:
                sys.exit(f"{args.kernel} cannot take {config}: {refused}")
        run = lambda: launch(x, *weights, None, args.group, config)  # noqa: E731
    for _ in range(args.launches):
        run()
    torch.cuda.synchronize()
    print(f"{args.launches} launches of {name} at {args.rows}x{k} -> {n}, {config}")
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        cache = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
        for path in glob.glob(os.path.join(cache, "*", name + ".*")):
            dst = os.path.join(args.dump, os.path.basename(os.path.dirname(path))[:8] + "_" + os.path.basename(path))
            shutil.copy(path, dst)
            if path.endswith(".cubin") and shutil.which("cuobjdump"):
                with open(dst.removesuffix(".cubin") + ".sass", "w") as out:
                    subprocess.run(["cuobjdump", "-sass", path], stdout=out, check=False)
        print("dumped", sorted(os.listdir(args.dump)))


if __name__ == "__main__":
    main()
