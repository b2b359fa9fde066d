"""FedPIA (arXiv 2412.14424): permuting and integrating adapters with Wasserstein barycenters.

A LoRA adapter is symmetric under permutations of its rank components: row i of A
together with column i of B can be reordered without changing B·A. Averaging adapters
whose components are in different orders mixes unrelated components; FedPIA aligns them
first. Each client has one LoRA (private). Per round and per adapted layer:

- Server: align every client's components to the current barycenter by optimal transport
  (uniform weights on equally many components, so the plan is a permutation:
  `scipy.optimize.linear_sum_assignment` on squared distances), average the aligned
  adapters weighted by samples, and repeat until the barycenter stops moving
  (`fedpia.tolerance`) or `fedpia.max_iterations`. It starts from the previous round's
  barycenter, or in the first round from the adapter of the client with most samples.
- Client: permute the received barycenter to match its own adapter, integrate the two
  as their two-point barycenter, (1 - w) * own + w * permuted global with
  w = `fedpia.global_weight`, train, and upload its adapter.

No public code exists; every choice above is ours and listed in the README.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np
import torch

from fedlrm.adapters import AdaptedLinear, adapter_parameters, get_state
from fedlrm.algorithms.base import Algorithm, ServerState, State
from fedlrm.algorithms.registry import register
from fedlrm.config import at_least_one, finite_nonnegative
from fedlrm.errors import ConfigError

LOCAL, GLOBAL = ".experts.local.", ".experts.global."


def components(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Rank components as rows: [A[i, :], B[:, i]]."""
    return torch.cat([A, B.t()], dim=1).double()


def split(z: torch.Tensor, d_in: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return z[:, :d_in].to(dtype).contiguous(), z[:, d_in:].t().to(dtype).contiguous()


def align(z: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Reorder the rows of `z` to match `reference`; returns them with the transport cost
    (sum of squared distances) before and after."""
    # imported here: scipy.optimize takes 0.4 s, and every ClientApp process imports the algorithms
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(z, reference).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    order = np.empty_like(cols)
    order[cols] = rows  # reference row j receives z row order[j]
    return z[torch.from_numpy(order)], float(np.trace(cost)), float(cost[rows, cols].sum())


def barycenter(adapters: list[torch.Tensor], weights: list[float], start: torch.Tensor,
               max_iterations: int, tolerance: float) -> tuple[torch.Tensor, float, float]:
    """Weighted Wasserstein barycenter of adapters given as component matrices, with the
    weighted transport cost to it before alignment (components in their own order) and
    after (optimally permuted)."""
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    bary = start.clone()
    for _ in range(max_iterations):
        aligned = [align(z, bary)[0] for z in adapters]
        new = sum(wi * z for wi, z in zip(w, aligned))
        moved = float((new - bary).norm())
        bary = new
        if moved <= tolerance:
            break
    costs = [align(z, bary) for z in adapters]
    before = float(sum(wi * c[1] for wi, c in zip(w, costs)))
    after = float(sum(wi * c[2] for wi, c in zip(w, costs)))
    return bary, before, after


@dataclass
class FedPIASettings:
    global_weight: float = 0.5  # client integration: (1 - w) * own + w * aligned global
    max_iterations: int = 10  # server barycenter: align-and-average passes at most
    tolerance: float = 1e-6  # stop when the barycenter moves less than this (Frobenius norm)


@dataclass
class TransportCosts:
    """The server's record: per round and layer, the transport cost of the uploads to the
    barycenter with their components in their own order and optimally permuted."""

    per_round: torch.Tensor | None = None  # (rounds, layers, 2): before / after alignment


@register
class FedPIA(Algorithm):
    name = "fedpia"
    Settings = FedPIASettings
    Record = TransportCosts
    aggregates_by_mean = False  # it looks at each upload
    has_global_model = False  # clients evaluate their integrated adapters

    @classmethod
    def check(cls, settings, cfg):
        at_least_one("fedpia.max_iterations", settings.max_iterations)
        if not 0 <= settings.global_weight <= 1:  # NaN fails this too
            raise ConfigError(f"fedpia.global_weight must be in [0, 1], got {settings.global_weight}")
        finite_nonnegative("fedpia.tolerance", settings.tolerance)

    def make_layer(self, linear, layout):
        return AdaptedLinear(linear, {"local": self.expert(linear, self.cfg.adapter.rank)})

    def layers(self, keys) -> list[str]:
        return sorted({k.rsplit(".experts.", 1)[0] for k in keys})

    def receive(self, model, ctx) -> None:
        received = ctx.received
        if not received:
            return
        params = adapter_parameters(model)
        with torch.no_grad():
            for layer in self.layers(received):
                A, B = params[f"{layer}{LOCAL}A"], params[f"{layer}{LOCAL}B"]
                own = components(A, B)
                permuted, _, _ = align(components(received[f"{layer}{GLOBAL}A"], received[f"{layer}{GLOBAL}B"]), own)
                weight = self.settings.global_weight
                A_new, B_new = split((1 - weight) * own + weight * permuted, A.shape[1], A.dtype)
                A.copy_(A_new)
                B.copy_(B_new)

    def upload(self, model, shared_keys, ctx) -> State:
        state = get_state(model)
        return {k.replace(LOCAL, GLOBAL): v for k, v in state.items() if LOCAL in k}

    def init_server(self, weights: State) -> ServerState:
        return ServerState(weights, TransportCosts())

    def aggregate(self, state: ServerState, uploads, server_round: int) -> ServerState:
        previous = state.weights
        weights = dict(previous)
        costs = []
        for layer in self.layers(uploads[0].state):
            zs = [components(u.state[f"{layer}{GLOBAL}A"], u.state[f"{layer}{GLOBAL}B"]) for u in uploads]
            if f"{layer}{GLOBAL}A" in previous:  # the last round's barycenter
                start = components(previous[f"{layer}{GLOBAL}A"], previous[f"{layer}{GLOBAL}B"])
            else:  # first round: the client with most samples (lowest id on a tie) is the reference
                start = zs[max(range(len(uploads)), key=lambda i: (uploads[i].num_examples, -uploads[i].client_id))]
            p = self.settings
            bary, before, after = barycenter(zs, [u.num_examples for u in uploads], start, p.max_iterations,
                                             p.tolerance)
            A0 = uploads[0].state[f"{layer}{GLOBAL}A"]
            weights[f"{layer}{GLOBAL}A"], weights[f"{layer}{GLOBAL}B"] = split(bary, A0.shape[1], A0.dtype)
            costs.append((before, after))
        row = torch.tensor(costs, dtype=torch.float64)[None]
        history = state.record.per_round
        return ServerState(weights, TransportCosts(row if history is None else torch.cat([history, row])))

    def write_report(self, run_dir, state: ServerState) -> None:
        if state.record.per_round is None:
            return
        layers = self.layers(k for k in state.weights if GLOBAL in k)
        history = state.record.per_round.numpy()
        with (run_dir / "transport.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["round", "layer", "cost_before_alignment", "cost_after_alignment"])
            for r, per_layer in enumerate(history, start=1):
                for layer, (before, after) in zip(layers, per_layer):
                    writer.writerow([r, layer, f"{before:.6g}", f"{after:.6g}"])
        plot_transport(run_dir / "transport.png", history)


def plot_transport(path, history) -> None:
    """FedPIA: transport cost of client adapters to the barycenter per round, before and after alignment."""
    from fedlrm.reporting import MaxNLocator, plt

    rounds = range(1, len(history) + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, history[:, :, 0].mean(1), marker="o", label="before alignment (own order)")
    ax.plot(rounds, history[:, :, 1].mean(1), marker="o", label="after alignment (permuted)")
    ax.set(xlabel="round", ylabel="transport cost, mean over layers", title="FedPIA: clients to barycenter")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
