"""The `prunus` command line."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table


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
        table.add_row(name, cls.kind, params, cls.doc())
    Console().print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prunus", description="a compiler for cheaper transformer inference")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("passes", help="list the registered passes with their params").set_defaults(func=_passes)
    args = parser.parse_args(argv)
    import prunus

    try:
        return args.func(args)
    except prunus.PrunusError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
