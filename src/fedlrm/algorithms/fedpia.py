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

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fedlrm.adapters import AdaptedLinear, adapter_parameters, get_state
from fedlrm.algorithms.base import Algorithm, State

LOCAL, GLOBAL = ".experts.local.", ".experts.global."
HISTORY = "server.transport"  # (rounds, layers, 2): transport cost before / after alignment


def components(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Rank components as rows: [A[i, :], B[:, i]]."""
    return torch.cat([A, B.t()], dim=1).double()


def split(z: torch.Tensor, d_in: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return z[:, :d_in].to(dtype).contiguous(), z[:, d_in:].t().to(dtype).contiguous()


def align(z: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Reorder the rows of `z` to match `reference`; returns them with the transport cost
    (sum of squared distances) before and after."""
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


class FedPIA(Algorithm):
    name = "fedpia"
    aggregates_by_mean = False  # it looks at each upload
    has_global_model = False  # clients evaluate their integrated adapters

    def make_layer(self, linear):
        return AdaptedLinear(linear, {"local": self.expert(linear, self.cfg.adapter.rank)})

    def layers(self, keys) -> list[str]:
        return sorted({k.rsplit(".experts.", 1)[0] for k in keys})

    def receive(self, model, received: State) -> None:
        if not received:
            return
        params = adapter_parameters(model)
        with torch.no_grad():
            for layer in self.layers(received):
                A, B = params[f"{layer}{LOCAL}A"], params[f"{layer}{LOCAL}B"]
                own = components(A, B)
                permuted, _, _ = align(components(received[f"{layer}{GLOBAL}A"], received[f"{layer}{GLOBAL}B"]), own)
                weight = self.cfg.fedpia.global_weight
                A_new, B_new = split((1 - weight) * own + weight * permuted, A.shape[1], A.dtype)
                A.copy_(A_new)
                B.copy_(B_new)

    def upload(self, model, shared_keys) -> State:
        state = get_state(model)
        return {k.replace(LOCAL, GLOBAL): v for k, v in state.items() if LOCAL in k}

    def aggregate(self, server_state: State, uploads) -> State:
        state = dict(server_state)
        costs = []
        for layer in self.layers(uploads[0].state):
            zs = [components(u.state[f"{layer}{GLOBAL}A"], u.state[f"{layer}{GLOBAL}B"]) for u in uploads]
            if f"{layer}{GLOBAL}A" in server_state:
                start = components(server_state[f"{layer}{GLOBAL}A"], server_state[f"{layer}{GLOBAL}B"])
            else:  # first round: the client with most samples (lowest id on a tie) is the reference
                start = zs[max(range(len(uploads)), key=lambda i: (uploads[i].num_examples, -uploads[i].client_id))]
            p = self.cfg.fedpia
            bary, before, after = barycenter(zs, [u.num_examples for u in uploads], start, p.max_iterations,
                                             p.tolerance)
            A0 = uploads[0].state[f"{layer}{GLOBAL}A"]
            state[f"{layer}{GLOBAL}A"], state[f"{layer}{GLOBAL}B"] = split(bary, A0.shape[1], A0.dtype)
            costs.append((before, after))
        row = torch.tensor(costs, dtype=torch.float64)[None]
        state[HISTORY] = torch.cat([server_state[HISTORY], row]) if HISTORY in server_state else row
        return state

    def write_report(self, run_dir, server_state: State) -> None:
        if HISTORY not in server_state:
            return
        from fedlrm.reporting import plot_transport

        layers = self.layers(k for k in server_state if GLOBAL in k)
        history = server_state[HISTORY].numpy()
        with (run_dir / "transport.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["round", "layer", "cost_before_alignment", "cost_after_alignment"])
            for r, per_layer in enumerate(history, start=1):
                for layer, (before, after) in zip(layers, per_layer):
                    writer.writerow([r, layer, f"{before:.6g}", f"{after:.6g}"])
        plot_transport(run_dir / "transport.png", history)
