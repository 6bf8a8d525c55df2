"""Compile a quantized-linear Triton kernel for a GPU without one, and count the instructions of its main loop.

    python benchmarks/sass_count.py --config BLOCK_N=64,GROUPS=2,SPLIT_K=1,PAIRS=1 [--kernel gemv] [--arch 90]
        [--group 128] [--dump DIR]
    python benchmarks/sass_count.py --fused   # the fuse pass's kernels for fuse_gpu.py's patterns (bf16)
    python benchmarks/sass_count.py --warp-specialize   # does Triton's automatic warp specialization take the loop?
    python benchmarks/sass_count.py --kernel wgmma --config BLOCK_M=128,BLOCK_N=128,BLOCK_K=64,STAGES=5,num_warps=8

To count what the GPU machine runs, put its Triton first on the path (its wheel: `pip install --no-deps
--target /tmp/t36 triton==3.6.0`, then `PYTHONPATH=/tmp/t36`): the bundled ptxas and cuobjdump come with it.
Prints the registers, the loop's instruction count by opcode, and instructions per weight code a thread
handles per step (codes = BLOCK_N * GROUPS * group / threads). The GEMV is issue-bound on an H100 (BENCHMARKS.md,
"int4 GEMV under Nsight Compute"), so fewer loop instructions per code is the number to lower between GPU runs.
"""
from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # fuse_gpu's patterns

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from prunus.kernels import quant_linear_triton as qt  # noqa: E402

POINTERS = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*bf16", z_ptr="*u8", b_ptr="*bf16", y_ptr="*bf16", ws_ptr="*fp32",
                cnt_ptr="*i32")
ALIGNED = {"K", "N", "stride_xm", "stride_wn", "stride_sn", "stride_zn", "stride_ym", "field_mask"}  # multiples of 16
KERNELS = {"gemv": qt._int4_gemv_kernel, "gemm": qt._int4_gemm_kernel}


def compile_kernel(fn, constants: dict, num_warps: int, num_stages: int, arch: int):
    names = fn.arg_names
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.default is not inspect.Parameter.empty}
    signature, values, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            values[(i,)] = constants.get(name, defaults.get(name))
        else:
            signature[name] = POINTERS.get(name, "i32")
            if name in POINTERS or name in ALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=values, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def loop_counts(sass: str) -> collections.Counter:
    """Opcodes between the target of the longest backward branch and that branch: the main loop."""
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?[A-Z0-9_.]+)([^;]*);", sass)
    best = None
    for addr, op, rest in lines:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if "BRA" in op and target and int(target.group(1), 16) < int(addr, 16):
            span = (int(target.group(1), 16), int(addr, 16))
            if best is None or span[1] - span[0] > best[1] - best[0]:
                best = span
    if best is None:
        return collections.Counter()
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", op).split(".")[0] for addr, op, _ in lines
                               if best[0] <= int(addr, 16) <= best[1])


def fused_counts(arch: int, fp_fusion: bool = False) -> None:
    """Static SASS size of each generated kernel of `benchmarks/fuse_gpu.py`'s patterns (bf16, small widths:
    the code does not depend on them), launched as the runtime would at llama-3-8b widths: reductions one
    4096-wide row a program on 8 warps, elementwise kernels over wide rows one row of `runtime.WIDE_BLOCK`
    columns a program on `runtime.WIDE_WARPS` warps."""
    import fuse_gpu
    import torch

    import prunus
    from prunus.codegen.triton import runtime

    fuse_gpu.HIDDEN, fuse_gpu.INTER = 256, 512
    for name, model, inputs in fuse_gpu.pattern_cases(8, "cpu", torch.bfloat16, 64):
        opt = prunus.optimize(model.to(torch.bfloat16), "fuse", example_inputs=inputs)
        for key in runtime.kernels_of(opt.graph.gm):
            kernel = runtime.get_kernel(key)
            reduction = any(part["reduction"] for part in kernel.parts())
            constants = dict(RB=1, BLOCK=4096 if reduction else runtime.WIDE_BLOCK, WIDE=0)
            warps = runtime._warps(4096) if reduction else runtime.WIDE_WARPS
            fn = kernel.module.kernel
            signature, values, attrs = {}, {}, {}
            for i, p in enumerate(fn.params):
                if p.is_constexpr:
                    signature[p.name], values[(i,)] = "constexpr", constants[p.name]
                elif p.name.endswith("_sn"):  # unit last-dim strides: Triton specializes 1 at launch
                    signature[p.name], values[(i,)] = "constexpr", 1
                else:
                    signature[p.name] = "*bf16" if p.name.endswith("_ptr") else "i32"
                    attrs[(i,)] = [["tt.divisibility", 16]]
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=values, attrs=attrs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=warps, enable_fp_fusion=fp_fusion))
            sass = _sass(compiled, "/tmp/prunus_fused.cubin")
            ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass)
            print(f"{name}: {len(ops)} instructions ({kernel.meta['pattern']}, {constants})")


@triton.jit
def _ws_matmul(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT4: tl.constexpr):
    """y = x W^T through TMA descriptors, the K loop marked for automatic warp specialization: W bf16 [N, K], or
    (INT4) packed int4 words [N, K / 8] dequantized in the loop as `_int4_gemm_kernel` (DEQUANT=3) does."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    if INT4:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K // 8], strides=[K // 8, 1],
                                           block_shape=[BLOCK_N, BLOCK_K // 8])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in tl.range(0, K // BLOCK_K, warp_specialize=True):
        xt = x_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
        if INT4:
            words = w_desc.load([pid_n * BLOCK_N, kb * (BLOCK_K // 8)])
            g = kb * BLOCK_K // GROUP
            scale = tl.load(s_ptr + offs_n * (K // GROUP) + g)
            zero = tl.load(z_ptr + offs_n * (K // GROUP) + g).to(tl.float32)
            w = qt._minus_zero(words, zero, tl.bfloat16) * scale[:, None]
        else:
            w = w_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])
        acc = tl.dot(xt, tl.trans(w), acc)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(tl.bfloat16))


def warp_specialize_check(arch: int) -> None:
    """Whether Triton's automatic warp specialization (`tl.range(warp_specialize=True)`) partitions a TMA-fed
    matmul loop on this arch: a plain bf16 one, and one with the int4 weight dequantized between load and MMA."""
    for name, int4 in (("bf16 matmul", 0), ("int4, dequantized in the loop", 1)):
        for warps in (4, 8):
            signature = dict(x_ptr="*bf16", w_ptr="*i32" if int4 else "*bf16", s_ptr="*bf16", z_ptr="*u8",
                             y_ptr="*bf16", M="i32", N="i32", K="i32")
            consts = dict(GROUP=128, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, INT4=int4)
            names = _ws_matmul.arg_names
            signature.update({k: "constexpr" for k in consts})
            source = ASTSource(fn=_ws_matmul, signature=signature,
                               constexprs={(names.index(k),): v for k, v in consts.items()},
                               attrs={(i,): [["tt.divisibility", 16]] for i in range(8)})
            try:
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                          options=dict(num_warps=warps, num_stages=3))
                result = ("partitioned (ttg.warp_specialize)" if "ttg.warp_specialize" in compiled.asm["ttgir"]
                          else "not partitioned")
            except Exception as exc:  # the pass can fail outright
                result = f"compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
            print(f"sm_{arch}, {name}, {warps} warps: {result}")


def _sass(compiled, path: str) -> str:
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    return subprocess.run([tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", choices=sorted(KERNELS) + ["wgmma", "gemv-mma"], default="gemv",
                    help="wgmma, gemv-mma: the Gluon kernels (prunus.kernels.quant_linear_gluon; CONFIGS, GEMV_CONFIGS)")
    ap.add_argument("--config", help="block sizes and variants, num_warps / num_stages too")
    ap.add_argument("--fused", action="store_true", help="count the fuse pass's kernels instead")
    ap.add_argument("--warp-specialize", action="store_true",
                    help="whether Triton's automatic warp specialization partitions a TMA matmul loop, plain and int4")
    ap.add_argument("--fp-fusion", action="store_true",
                    help="--fused: compile with FMA contraction on (the runtime launches with it off since 004a615)")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dump", default=None, help="directory for the .ttgir / .ptx / .sass")
    args = ap.parse_args()
    if args.fused:
        fused_counts(args.arch, args.fp_fusion)
        return
    if args.warp_specialize:
        warp_specialize_check(args.arch)
        return
    if not args.config:
        ap.error("--config is required (or --fused)")
    config = {key: int(value) for key, value in (item.split("=") for item in args.config.split(","))}
    if args.kernel == "wgmma":
        from prunus.kernels import quant_linear_gluon as qg

        warps = config["num_warps"]
        kernel = qg.compile_for(config, args.arch, group=args.group)
    elif args.kernel == "gemv-mma":
        from prunus.kernels import quant_linear_gluon as qg

        warps = config["num_warps"]
        kernel = qg.compile_for(config, args.arch, group=args.group, kernel="gemv")
    else:
        warps, stages = config.pop("num_warps", 4), config.pop("num_stages", 3)
        kernel = compile_kernel(KERNELS[args.kernel], {"GROUP": args.group, "HAS_BIAS": 0, **config}, warps, stages,
                                args.arch)
    cubin = os.path.join(args.dump or "/tmp", "kernel.cubin")
    os.makedirs(os.path.dirname(cubin), exist_ok=True)
    sass = _sass(kernel, cubin)
    usage = subprocess.run([tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
    if args.dump:
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(args.dump, f"kernel.{ext}"), "w") as f:
                f.write(kernel.asm[ext])
        with open(os.path.join(args.dump, "kernel.sass"), "w") as f:
            f.write(sass)
    regs = re.search(r"REG:(\d+)", usage)
    if args.kernel == "wgmma":  # its longest backward branch is an mbarrier retry, not the K loop: whole-kernel counts
        ops = collections.Counter(op.split(".")[0] for op in re.findall(
            r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass))
        print(f"triton {triton.__version__}, sm_{args.arch}, wgmma {config}: registers {regs.group(1) if regs else '?'}"
              f", shared memory {kernel.metadata.shared} bytes, {sum(ops.values())} instructions in all")
        print("  " + ", ".join(f"{op} {ops[op]}" for op in ("HGMMA", "WARPGROUP", "BAR", "UTMALDG", "LDG", "STS")))
        aliased = qg.wgmma_a_aliasing(sass)
        print(f"  register-operand HGMMAs whose A registers are written while in flight: {len(aliased)}")
        for line in aliased:
            print("    " + line)
        return
    loop = loop_counts(sass)
    line = f"triton {triton.__version__}, sm_{args.arch}, {args.kernel} {config} warps={warps}: "
    line += f"registers {regs.group(1) if regs else '?'}, loop {sum(loop.values())} instructions"
    if args.kernel == "gemv-mma":  # a step: 128 codes of 16 REPS rows a warp
        codes = 16 * config["REPS"] * 128 // 32
        line += f" for {codes} codes a thread ({sum(loop.values()) / codes:.2f} a code)"
    elif args.kernel == "gemv":
        codes = config["BLOCK_N"] * config["GROUPS"] * args.group // (32 * warps)
        line += f", {codes} codes a thread a step: {sum(loop.values()) / codes:.2f} a code"
    print(line)
    print("  " + ", ".join(f"{op} {n}" for op, n in loop.most_common(12)))


if __name__ == "__main__":
    main()
