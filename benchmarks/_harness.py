"""What every maintained benchmark records beside its numbers, and how it writes them.

``record(name, data, markdown)`` writes ``results/<name>.json`` (the numbers and :func:`meta`) and
``results/<name>.md`` (the tables, then the meta block), so every result says which machine, dtype,
threads, torch version, commit and command produced it, and whether the machine was busy.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def busy() -> float:
    """The machine's 1-minute load average per core (above ~0.3 before a run, other work competes)."""
    return os.getloadavg()[0] / (os.cpu_count() or 1)


def meta(dtype: str, **extra: object) -> dict:
    """Machine, dtype, threads, torch version, commit, date and the command line."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
            "commit": commit, "machine": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "dtype": dtype, "load_per_core_at_start": round(busy(), 2), **extra}


def spread(values: list[float]) -> dict:
    """Median and range of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": len(values)}


def record(name: str, data: dict, markdown: str, out: Path = RESULTS) -> Path:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.md``; returns the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    m = data.get("meta", {})
    lines = [markdown.rstrip(), "", "Run: " + ", ".join(f"{k} `{v}`" for k, v in m.items() if k != "command"),
             "", "```", m.get("command", ""), "```", ""]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines))
    return path
