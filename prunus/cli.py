"""The `prunus` command line: optimize, dump, eval, passes, bench.

Every mistake a user can make ends in a one-line error and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console() if Console().is_terminal else Console(width=140)


class CLIError(Exception):
    """A bad command-line argument (printed as one line)."""


def _example_inputs(model, tok):
    """Two windows of the default corpus for language models; random inputs of the right kind otherwise."""
    from prunus.data import window_batch
    from prunus.models import example_inputs

    return example_inputs(model) if tok is None else window_batch(tok, 2, 16, seed=1234)


def _optimize(args) -> int:
    import prunus
    from prunus.data import Calibration

    if args.onnx and not args.out:
        raise CLIError("--onnx writes model.onnx into the artifact: give --out DIR too")
    with console.status(f"loading {args.model}"):
        model, tok = prunus.models.load(args.model)
    calibration = None
    if args.calib:
        if tok is None:
            raise CLIError(f"--calib needs a tokenizer and {args.model} has none")
        calibration = Calibration.from_corpus(tok, args.calib, seq_len=args.calib_len)
    pipeline = prunus.passes.build_pipeline(args.passes)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("capturing", total=len(pipeline))

        def step(i, n, name):
            progress.update(task, completed=i, description=f"ran {name}")

        opt = prunus.optimize(model, pipeline, example_inputs=_example_inputs(model, tok), calibration=calibration,
                              dump_dir=args.dump_dir, progress=step)
    opt.source = args.model
    console.print(prunus.report_table(opt))
    if args.out:
        with console.status(f"writing {args.out}" + (" (with ONNX)" if args.onnx else "")):
            opt.save(args.out, onnx=args.onnx)
        console.print(f"artifact written to {args.out}")
    return 0


def _load_target(name: str):
    """(model, tokenizer) for a zoo name / HF directory, or (OptimizedModel, its source's tokenizer)."""
    import prunus

    if os.path.isdir(name) and os.path.exists(os.path.join(name, "pipeline.json")):
        opt = prunus.load(name)
        if not opt.source:
            raise CLIError(f"{name} does not record the model it came from, so its tokenizer is unknown")
        return opt, prunus.models.load(opt.source)[1], opt.source
    model, tok = prunus.models.load(name)
    return model, tok, name


def _eval(args) -> int:
    import prunus
    from prunus.data import window_batch

    with console.status(f"loading {args.target}"):
        model, tok, source = _load_target(args.target)
    if tok is None:
        raise CLIError(f"--task {args.task} needs a tokenizer and {source} has none")
    table = Table(title=f"prunus eval {args.target}: {args.task}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    with console.status(f"running {args.task}"):
        if args.task == "ppl":
            value = prunus.eval.perplexity(model, tok, seq_len=args.seq_len, max_tokens=args.max_tokens)
            table.add_row(f"perplexity ({args.max_tokens} tokens, {args.seq_len}-token windows)", f"{value:.3f}")
        elif args.task == "long_ppl":
            value = prunus.eval.long_ppl(model, tok, max_tokens=args.max_tokens)
            table.add_row(f"streaming perplexity ({args.max_tokens} tokens)", f"{value:.3f}")
        elif args.task == "passkey":
            value = prunus.eval.passkey(model, tok, context_tokens=args.context, n=args.n)
            table.add_row(f"passkey accuracy ({args.n} prompts, ~{args.context} tokens)", f"{value:.2f}")
        elif args.task == "fidelity":
            ref_name = args.ref or source
            if ref_name == args.target:
                raise CLIError("--task fidelity compares against --ref MODEL (an artifact defaults to its source)")
            reference = _load_target(ref_name)[0]
            result = prunus.eval.fidelity(reference, model, window_batch(tok, 4, 128, seed=99))
            for key, value in result.items():
                table.add_row(f"{key} vs {ref_name}", f"{value:.4g}")
        else:
            inputs = window_batch(tok, 1, args.seq_len, seed=7)
            for key, value in prunus.eval.speed(model, inputs).items():
                table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    return 0


def _dump(args) -> int:
    from prunus.dump import dump

    rendered = dump(args.path, args.format, after=args.after, diff=args.diff)
    if args.output:
        mode = "wb" if isinstance(rendered, bytes) else "w"
        with open(args.output, mode) as f:
            f.write(rendered)
        console.print(f"wrote {args.output}")
    elif isinstance(rendered, bytes):
        sys.stdout.buffer.write(rendered)
    else:
        sys.stdout.write(rendered)
    return 0


def _passes(args) -> int:
    import prunus

    table = Table(title="prunus passes")
    for col in ("pass", "kind", "params", "doc"):
        table.add_column(col)
    for name, cls in prunus.passes.registry().items():
        if name.startswith("test_"):
            continue
        params = "\n".join(f"{f.name}: {cls.describe_param(f)} - {f.metadata.get('doc', '')}"
                           for f in cls.param_fields()) or "-"
        table.add_row(name, cls.kind, Text(params), Text(cls.doc()))  # "[layer, keep]" is text, not markup
    console.print(table)
    return 0


def benchmarks_dir() -> str:
    """The checkout's `benchmarks/` folder, beside the `prunus` package (an editable install, as `make setup`)."""
    import prunus

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(prunus.__file__))), "benchmarks")


def _suites() -> dict[str, tuple[str, str]]:
    """name -> (script path, what it measures: the first paragraph of its docstring), read without importing."""
    import ast

    folder = benchmarks_dir()
    if not os.path.isdir(folder):
        raise CLIError(f"prunus bench runs the suites of a source checkout, and there is no benchmarks/ folder at "
                       f"{folder}: clone the repository and install it with `pip install -e .` (or `make setup`)")
    suites = {}
    for entry in sorted(os.listdir(folder)):
        if entry.endswith(".py") and not entry.startswith("_"):
            path = os.path.join(folder, entry)
            with open(path) as f:
                doc = ast.get_docstring(ast.parse(f.read())) or ""
            suites[entry[:-3]] = (path, " ".join(doc.split("\n\n")[0].split()))
    return suites


def _bench(args) -> int:
    import subprocess

    suites = _suites()
    if args.suite is None:
        table = Table(title="prunus bench SUITE [ARGS...]: the suites (ARGS go to the suite; see SUITE --help)")
        table.add_column("suite")
        table.add_column("measures")
        for name, (_, doc) in suites.items():
            table.add_row(name, Text(doc))
        console.print(table)
        return 0
    name = args.suite.removesuffix(".py").replace("-", "_")
    if name not in suites:
        raise CLIError(f"unknown suite '{args.suite}': one of {', '.join(suites)} (`prunus bench` lists them)")
    root = os.path.dirname(benchmarks_dir())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    # run from the checkout: each suite appends its table to the checkout's BENCHMARKS.md, with the command
    return subprocess.run([sys.executable, os.path.relpath(suites[name][0], root), *args.args], cwd=root,
                          env=env).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunus", description="a compiler for cheaper transformer inference")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("optimize", help="capture a model and run a pass pipeline")
    p.add_argument("model", help="zoo name (smollm2-135m, minilm-l6, tiny-llama, ...) or a Hugging Face directory")
    p.add_argument("--passes", required=True, help='pipeline text, e.g. "dce, fold_constants"')
    p.add_argument("--calib", type=int, default=0, metavar="N", help="N calibration windows of the default corpus")
    p.add_argument("--calib-len", type=int, default=128, metavar="TOKENS", help="tokens per calibration window")
    p.add_argument("--out", metavar="DIR", help="write the artifact here")
    p.add_argument("--onnx", action="store_true", help="also export model.onnx into the artifact")
    p.add_argument("--dump-dir", metavar="DIR", help="write the IR after every pass here")
    p.set_defaults(func=_optimize)

    p = sub.add_parser("eval", help="evaluate a model or an artifact")
    p.add_argument("target", metavar="MODEL_OR_DIR")
    p.add_argument("--task", required=True, choices=["ppl", "passkey", "fidelity", "long_ppl", "speed"])
    p.add_argument("--ref", metavar="MODEL", help="reference for --task fidelity (default: the artifact's source)")
    p.add_argument("--seq-len", type=int, default=512, help="window for ppl, prompt length for speed")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=320, help="passkey context in tokens")
    p.add_argument("-n", type=int, default=6, help="passkey prompts")
    p.set_defaults(func=_eval)

    p = sub.add_parser("dump", help="show a graph: an artifact directory, a .pt2 or an .onnx file")
    p.add_argument("path")
    p.add_argument("--format", default="text", choices=["text", "json", "dot", "svg", "html"])
    p.add_argument("--after", metavar="PASS", help="the graph after this pass (artifacts keep one per pass)")
    p.add_argument("--diff", metavar="OTHER", help="compare with another graph")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")
    p.set_defaults(func=_dump)

    sub.add_parser("passes", help="list the registered passes with their params").set_defaults(func=_passes)

    p = sub.add_parser("bench", help="run a benchmark suite of benchmarks/ (none given: list them)")
    p.add_argument("suite", nargs="?", help="e.g. quant_linear_gpu or fuse-gpu")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the suite's own arguments (SUITE --help shows them)")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed a one-line usage error
        return int(e.code or 0)
    import prunus

    try:
        return args.func(args)
    except (prunus.PrunusError, CLIError) as e:
        _error(str(e))
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        _error(str(e))
        return 2


def _error(message: str) -> None:
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    first, *rest = message.splitlines() or [""]
    err.print(f"[red]error:[/red] {first}", markup=True)
    for line in rest:
        err.print(line, markup=False)


if __name__ == "__main__":
    sys.exit(main())
