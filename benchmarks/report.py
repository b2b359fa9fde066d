"""Assemble BENCHMARKS.md at the repository root from the benchmarks' own reports.

    python benchmarks/accuracy.py      # writes benchmarks/results/accuracy/accuracy.md and plots
    python benchmarks/cost.py          # writes benchmarks/results/cost.md
    python benchmarks/report.py        # BENCHMARKS.md = this header + both reports

Nothing here computes a figure: it only puts the generated sections under one header, with
relative image links rewritten for the root, so BENCHMARKS.md always says what the result
files say.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = [RESULTS / "accuracy" / "accuracy.md", RESULTS / "cost.md"]

HEADER = """# Benchmarks

Two benchmarks, both scripts (not tests, not run in CI), each writing its raw figures beside
its report:

- **Accuracy** (`benchmarks/accuracy.py`, raw runs in `benchmarks/results/accuracy/runs.csv`):
  the FedLRM paper's protocol on real CIFAR-10 and Caltech101 for every algorithm, on this
  project's small pretrained backbone, with the paper's numbers beside ours.
- **Cost** (`benchmarks/cost.py`, raw figures in `benchmarks/results/cost.json`): what a
  training step and a round cost, for the small backbone and the ViT-B/32 and ViT-B/16
  architectures, measured side by side in one run.

Every figure below was produced by those scripts on a 2-core CPU without a GPU; the
sections say what was reduced against the paper and which targets were missed.

Why the frozen-prefix target (at least 2x faster local training) is missed: the cache
removes the forward passes of the frozen blocks, but the blocks that train still run
forward and backward at every step, and their backward costs more than their forward.
With the top third of ViT-B/16 training, that part is most of a step, which bounds the
speed-up below 2x however the frozen part is handled. The small model (one of four blocks
trained) sits near 2x, and its local training lasts about a second, so its ratio moves
between runs (section 5 and the closing note of issue 7 give both measurements).
"""


def section(path: Path) -> str:
    if not path.is_file():
        return f"\n*{path.relative_to(ROOT)} is missing: run the benchmark that writes it.*\n"
    text = path.read_text()
    base = path.parent.relative_to(ROOT)
    # image links in a report are relative to its own folder
    return re.sub(r"\]\((?!https?:|/)([^)]+\.png)\)", lambda m: f"]({base}/{m.group(1)})", text)


def main() -> None:
    body = "\n\n".join(section(p).strip() for p in SECTIONS)
    (ROOT / "BENCHMARKS.md").write_text(HEADER + "\n" + body + "\n")
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
