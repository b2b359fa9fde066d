"""Parameter counts on an actually built model: trainable, uploaded per round, full fine-tuning.

For the paper's Table 1 a synthetic model stands in for the backbone: `layers` blocks
with one `dim x dim` linear each, adapted exactly as a real backbone would be.
"""

from __future__ import annotations

from dataclasses import replace

from rich.console import Console
from rich.table import Table
from torch import nn

from fedlrm.adapters import adapted_weight_count, adapter_parameters, inject_adapters
from fedlrm.algorithms import ALGORITHMS
from fedlrm.config import RunConfig
from fedlrm.reporting import wide_console


class SyntheticEncoder(nn.Module):
    def __init__(self, layers: int, dim: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(dim, dim)}) for _ in range(layers))


def count_model(root: nn.Module, targets: list[str], algorithm, target_layers=None) -> dict:
    inject_adapters(root, targets, algorithm.make_layer, target_layers)
    params = adapter_parameters(root)
    shared = [k for k in params if algorithm.is_shared(k)]
    return {
        "trainable": sum(p.numel() for p in params.values()),
        # what the algorithm's own upload holds on this model (before any layer selection)
        "uploaded": sum(v.numel() for v in algorithm.upload(root, shared).values()),
        "full_finetune": adapted_weight_count(root),
    }


def count_parameters(cfg: RunConfig, ranks: list[int], local_rank: int, algorithm: str | None = None,
                     layers: int | None = None, dim: int = 256) -> list[dict]:
    names = [algorithm] if algorithm else [n for n, cls in ALGORITHMS.items() if cls.trains]
    backbone = None
    if layers is None:
        from fedlrm.models import load_backbone

        backbone = load_backbone(cfg.model)
    rows = []
    for rank in ranks:
        run = replace(cfg, adapter=replace(cfg.adapter, rank=rank, local_rank=local_rank))
        for name in names:
            algo = ALGORITHMS[name](replace(run, algorithm=name))
            if not algo.trains:
                continue
            if layers is not None:
                root, targets, blocks = SyntheticEncoder(layers, dim), ["proj"], None
            else:
                import copy

                root, targets, blocks = copy.deepcopy(backbone.image_encoder), cfg.model.target_modules, \
                    cfg.model.target_layers
            counts = count_model(root, targets, algo, blocks)
            rows.append({"algorithm": name, "global_rank": rank, "local_rank": local_rank, **counts})
    return rows


def print_counts(rows: list[dict], title: str, console: Console | None = None) -> None:
    table = Table(title=title)
    for col in ("algorithm", "global rank", "local rank", "trainable", "uploaded / round",
                "full fine-tuning", "trainable / full", "uploaded / full"):
        table.add_column(col, justify="left" if col == "algorithm" else "right")
    for r in rows:
        full = r["full_finetune"]
        table.add_row(r["algorithm"], str(r["global_rank"]), str(r["local_rank"]), f"{r['trainable']:,}",
                      f"{r['uploaded']:,}", f"{full:,}", f"{100 * r['trainable'] / full:.1f} %",
                      f"{100 * r['uploaded'] / full:.1f} %")
    (console or wide_console()).print(table)
