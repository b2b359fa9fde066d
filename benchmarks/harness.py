"""What every benchmark here needs and none should write again: measurements in child
processes, memory probes, the machine and how busy it was, and tables printed and kept as
markdown. Benchmarks import fedlrm's public contract only (import-linter checks it).

A benchmark that measures in children runs itself as `python SCRIPT --child SPEC`; the
child maps `spec["kind"]` to one of its functions and prints that function's JSON answer as
its last line of stdout (`child_main`). `Children.run` starts one such process per
measurement, so that each peak RSS is that measurement's own, and keeps the answers so that
sections needing the same measurement share one.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

GIB = 1024 ** 3
# Children must never reach for the network (no weights can be downloaded here).
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------- child processes
def child_main(raw: str, kinds: dict[str, Callable[[dict], dict]]) -> None:
    """In a child: run the measurement `raw` (a JSON spec) names and print its answer."""
    spec = json.loads(raw)
    print(json.dumps(kinds[spec["kind"]](spec)))  # the last line of stdout is the parent's


class Children:
    """Runs each measurement of `script` in a process of its own; answers are kept by spec."""

    def __init__(self, script: str | Path):
        self.script = str(Path(script).resolve())
        self.done: dict[str, dict] = {}
        self.started = time.perf_counter()

    def run(self, spec: dict, label: str) -> dict:
        key = json.dumps(spec, sort_keys=True)
        if key not in self.done:
            self.done[key] = self._spawn(spec, label)
        return self.done[key]

    def known(self, spec: dict) -> dict | None:
        """The answer to `spec` if it was measured already."""
        return self.done.get(json.dumps(spec, sort_keys=True))

    def _spawn(self, spec: dict, label: str) -> dict:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, self.script, "--child", json.dumps(spec)], check=False,
                              capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
        elapsed = time.perf_counter() - t0
        print(f"[{time.perf_counter() - self.started:7.0f} s] {label}: {elapsed:.1f} s", file=sys.stderr, flush=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-5:]
            print("  failed: " + "\n  ".join(tail), file=sys.stderr)
            return {"error": tail[-1] if tail else f"exit code {proc.returncode}"}
        return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- memory of a process
def rss_kib() -> int:
    """The current resident set size (VmRSS), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def reset_peak() -> bool:
    """Set the process's peak RSS to its current RSS (Linux clear_refs 5), so that a peak read
    later is that of what ran since, not that of loading; False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------- the machine
def cpuinfo(field: str) -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(field):
            return line.split(":", 1)[1].strip()
    return ""


def machine_info(threads: int) -> dict:
    import torch
    import transformers

    flags = cpuinfo("flags").split()
    return {"cpu": cpuinfo("model name") or platform.processor(), "logical_cpus": os.cpu_count(), "threads": threads,
            "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags],
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB}


def cpu_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used (user, system, irq), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    own = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(r.ru_utime + r.ru_stime for r in own)


class CpuWatch:
    """How much of the machine's CPU other processes used while a benchmark ran: timings are
    only meaningful on an otherwise idle machine."""

    def __enter__(self) -> CpuWatch:
        self.load_before = os.getloadavg()
        self.start, self.busy0, self.own0 = time.perf_counter(), cpu_busy_seconds(), own_cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self.others_cpu_s = max(0.0, (cpu_busy_seconds() - self.busy0) - (own_cpu_seconds() - self.own0))
        self.others_share = self.others_cpu_s / (self.seconds * os.cpu_count())
        self.load_after = os.getloadavg()


# ------------------------------------------------------------------------------------- reports
class Report:
    """Tables and text printed with rich and kept as markdown."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(width=170)  # wide tables stay readable in a log file
        self.md: list[str] = []

    def heading(self, text: str) -> None:
        self.console.rule(text, style="bold")
        self.md += [f"## {text}", ""]

    def text(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)
        self.md += [text, ""]

    def bullets(self, items: list[str]) -> None:
        for item in items:
            self.console.print(f"- {item}", markup=False, highlight=False)
        self.md += [f"- {item}" for item in items] + [""]

    def table(self, headers: list[str], rows: list[list]) -> None:
        from rich.table import Table
        from rich.text import Text

        t = Table(*headers)
        for row in rows:
            t.add_row(*(Text(str(cell)) for cell in row))  # Text: a "[0, 1]" is data, not rich markup
        self.console.print(t)
        self.md += ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
        self.md += ["| " + " | ".join(map(str, row)) + " |" for row in rows] + [""]


def fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def on_off(flag: bool | None) -> str:
    return {True: "on", False: "off"}.get(flag, "?")
