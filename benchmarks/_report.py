"""Shared by every benchmark: device description, commit, and appending a table to BENCHMARKS.md."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"


def commit() -> str:
    """The checkout's commit; PRUNUS_COMMIT names it where the tree has no .git (the GPU machine's copy)."""
    if os.environ.get("PRUNUS_COMMIT"):
        return os.environ["PRUNUS_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def append(title: str, columns: list[str], rows: list[list], notes: str = "", path: str | None = None) -> str:
    """Append a dated section with the exact command to BENCHMARKS.md (or `path`); return the markdown."""
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    section = (f"\n## {title}\n\n"
               f"- date: {datetime.date.today().isoformat()}\n- device: {device()}\n- commit: {commit()}\n"
               f"- command: `{command}`\n\n{markdown_table(columns, rows)}\n")
    if notes:
        section += f"\n{notes.strip()}\n"
    target = path or os.path.join(ROOT, "BENCHMARKS.md")
    if not os.path.exists(target):
        with open(target, "w") as f:
            f.write("# Benchmarks\n\nEvery table below was appended by the command it names. Quote only these.\n")
    with open(target, "a") as f:
        f.write(section)
    return section
