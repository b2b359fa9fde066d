"""Parameter counts on an actually built model: trainable, uploaded per round, full fine-tuning.

For the paper's Table 1 a synthetic model stands in for the backbone: `layers` blocks
with one `dim x dim` linear each, adapted exactly as a real backbone would be.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from rich.console import Console
from rich.table import Table
from torch import nn

from fedlrm.adapters import adapted_weight_count, adapter_parameters, inject_adapters
from fedlrm.algorithms import ALGORITHMS, ClientRound
from fedlrm.config import RunConfig
from fedlrm.models import load_backbone
from fedlrm.reporting import wide_console


class SyntheticEncoder(nn.Module):
    def __init__(self, layers: int, dim: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(dim, dim)}) for _ in range(layers))


def count_model(root: nn.Module, targets: list[str], algorithm, target_layers=None) -> dict:
    """Counts of the algorithm's adapters in their first layout (before any clustering)."""
    layout = algorithm.layout_of({})
    inject_adapters(root, targets, lambda linear: algorithm.make_layer(linear, layout), target_layers)
    params = adapter_parameters(root)
    shared = [k for k in params if algorithm.is_shared(k)]
    first_round = ClientRound(0, 1, {})
    return {
        "trainable": sum(p.numel() for p in params.values()),
        # what the algorithm's own upload holds on this model (before any layer selection)
        "uploaded": sum(v.numel() for v in algorithm.upload(root, shared, first_round).values()),
        "full_finetune": adapted_weight_count(root),
    }


def count_parameters(cfg: RunConfig, ranks: list[int], local_rank: int | None = None, algorithm: str | None = None,
                     layers: int | None = None, dim: int = 256) -> list[dict]:
    """Counts per algorithm and global rank; `local_rank` replaces the rank of the local expert
    of the methods that have one (their `local_rank` setting)."""
    names = [algorithm] if algorithm else [n for n, cls in ALGORITHMS.items() if cls.trains]
    backbone = None if layers is not None else load_backbone(cfg.model)
    rows = []
    for rank in ranks:
        for name in names:
            own = cfg.methods[name]
            if local_rank is not None and hasattr(own, "local_rank"):
                own = replace(own, local_rank=local_rank)
            run = replace(cfg, algorithm=name, adapter=replace(cfg.adapter, rank=rank),
                          methods={**cfg.methods, name: own})
            algo = ALGORITHMS[name](run)
            if not algo.trains:
                continue
            if layers is not None:
                root, targets, blocks = SyntheticEncoder(layers, dim), ["proj"], None
            else:
                root, targets, blocks = copy.deepcopy(backbone.image_encoder), cfg.model.target_modules, \
                    cfg.model.target_layers
            counts = count_model(root, targets, algo, blocks)
            rows.append({"algorithm": name, "global_rank": rank, "local_rank": getattr(own, "local_rank", None),
                         **counts})
    return rows


def print_counts(rows: list[dict], title: str, console: Console | None = None) -> None:
    table = Table(title=title)
    for col in ("algorithm", "global rank", "local rank", "trainable", "uploaded / round",
                "full fine-tuning", "trainable / full", "uploaded / full"):
        table.add_column(col, justify="left" if col == "algorithm" else "right")
    for r in rows:
        full = r["full_finetune"]
        local = "-" if r["local_rank"] is None else str(r["local_rank"])
        table.add_row(r["algorithm"], str(r["global_rank"]), local, f"{r['trainable']:,}", f"{r['uploaded']:,}",
                      f"{full:,}", f"{100 * r['trainable'] / full:.1f} %", f"{100 * r['uploaded'] / full:.1f} %")
    (console or wide_console()).print(table)
