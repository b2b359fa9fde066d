"""FedLEASE (arXiv 2509.15087): clustered LoRA experts with adaptive top-M routing.

1. Warm-up (`fedlease.warmup_rounds`): each client trains one purely local LoRA and
   uploads it; the server keeps each client's latest one and sends nothing back.
2. At the end of warm-up the server clusters the clients on their LoRA B matrices
   (cosine distance per layer, averaged over layers; agglomerative clustering with
   average linkage on the precomputed distances; k in [2, max_clusters] by silhouette),
   and starts one expert per cluster from the sample-weighted mean of its members' LoRAs.
3. Then every client receives all M experts and its cluster index, trains its own
   cluster's expert and its router (`TopMRouter`), and uploads that expert only; the
   server averages each expert over its cluster's uploads, weighted by samples.

Where the issue and DESIGN.md are silent this follows the official code, except as
noted in the README (routers stay private; sample-weighted rather than plain means).
"""

from __future__ import annotations

import json
import re

import numpy as np
import torch

from fedlrm.adapters import AdaptedLinear, TopMRouter, adapted_layers, adapter_parameters, get_state, set_state
from fedlrm.algorithms.base import Algorithm, State, weighted_mean

EXPERT = re.compile(r"\.experts\.e(\d+)\.")
LOCAL = ".experts.local."
CLUSTER = "fedlease.cluster"  # the one non-weight entry of a client's message


class FedLEASE(Algorithm):
    name = "fedlease"
    aggregates_by_mean = False  # it looks at each upload
    has_global_model = False  # one model per cluster, none for everyone

    def __init__(self, cfg):
        super().__init__(cfg)
        self.n_experts = 0  # 0 is the warm-up layout: one local LoRA
        self.own = 0

    # ----- model ------------------------------------------------------------------------
    def layout(self, message: State) -> int:
        return len({int(m.group(1)) for k in message if (m := EXPERT.search(k))})

    def use_layout(self, layout: int) -> None:
        self.n_experts = layout

    def make_layer(self, linear):
        rank = self.cfg.adapter.rank
        if not self.n_experts:
            return AdaptedLinear(linear, {"local": self.expert(linear, rank)})
        experts = {f"e{j}": self.expert(linear, rank) for j in range(self.n_experts)}
        return AdaptedLinear(linear, experts, TopMRouter(linear.in_features, self.n_experts))

    def is_shared(self, key: str) -> bool:
        return EXPERT.search(key) is not None

    def private_init_key(self, client_id: int) -> object:
        # Warm-up LoRAs start alike, so that their B matrices differ by what the data taught
        # them rather than by their random A (the clustering compares B alone).
        return "warm-up"

    # ----- messages and client side -----------------------------------------------------
    def message_for(self, client_id: int, server_state: State) -> State:
        message = super().message_for(client_id, server_state)
        if "server.assignment" in server_state:
            message[CLUSTER] = server_state["server.assignment"][client_id].clone()
        return message

    def receive(self, model, received: State) -> None:
        set_state(model, {k: v for k, v in received.items() if k != CLUSTER})
        if CLUSTER not in received:
            return
        self.own = int(received[CLUSTER])
        for _, layer in adapted_layers(model):
            layer.mixer.own.fill_(self.own)
            for name, expert in layer.experts.items():
                expert.requires_grad_(name == f"e{self.own}")  # the other clusters' experts stay fixed

    def upload(self, model, shared_keys: list[str]) -> State:
        if not self.n_experts:  # warm-up: the local LoRA, for clustering
            return get_state(model, [k for k in adapter_parameters(model) if LOCAL in k])
        mark = f".experts.e{self.own}."
        return get_state(model, [k for k in shared_keys if mark in k])

    # ----- server side ------------------------------------------------------------------
    def aggregate(self, server_state: State, uploads) -> State:
        state = dict(server_state)
        done = int(state.get("server.round", torch.tensor(0))) + 1
        state["server.round"] = torch.tensor(done)
        if "server.assignment" in state:
            state.update(weighted_mean(uploads))  # each expert over the uploads of its cluster
            return state
        n = self.cfg.data.num_clients
        examples = state.get("server.examples", torch.zeros(n, dtype=torch.int64)).clone()
        for u in uploads:
            examples[u.client_id] = u.num_examples
            state.update({f"server.warmup.{u.client_id}.{k}": v for k, v in u.state.items()})
        state["server.examples"] = examples
        if done >= self.cfg.fedlease.warmup_rounds:
            state.update(self.start_clusters(state))
        return state

    def start_clusters(self, state: State) -> State:
        """Cluster the clients on their warm-up LoRAs and start one expert per cluster."""
        n = self.cfg.data.num_clients
        loras = {c: {k.split(".", 3)[3]: v for k, v in state.items() if k.startswith(f"server.warmup.{c}.")}
                 for c in range(n)}
        seen = [c for c in range(n) if loras[c]]
        b_keys = sorted(k for k in loras[seen[0]] if k.endswith(f"{LOCAL}B"))
        features = [[loras[c][k] for k in b_keys] for c in seen]
        distances, candidates, labels = cluster_clients(features, self.cfg.fedlease.max_clusters)
        assignment = np.zeros(n, dtype=np.int64)
        assignment[seen] = labels
        if len(seen) < n:  # never sampled during warm-up: join the largest cluster
            assignment[[c for c in range(n) if c not in seen]] = np.bincount(labels).argmax()
        experts = {}
        for j in range(int(labels.max()) + 1):
            members = [c for c in seen if assignment[c] == j]
            weights = torch.tensor([float(state["server.examples"][c]) for c in members], dtype=torch.float64)
            weights /= weights.sum()
            for key in loras[seen[0]]:
                mean = sum(w * loras[c][key].double() for w, c in zip(weights, members))
                experts[key.replace(LOCAL, f".experts.e{j}.")] = mean.to(loras[seen[0]][key].dtype)
        full = np.full((n, n), np.nan)
        full[np.ix_(seen, seen)] = distances
        return {**experts, "server.assignment": torch.from_numpy(assignment),
                "server.distances": torch.from_numpy(full),
                "server.silhouette": torch.tensor(candidates, dtype=torch.float64).reshape(-1, 2)}

    # ----- records ----------------------------------------------------------------------
    def write_report(self, run_dir, server_state: State) -> None:
        if "server.assignment" not in server_state:
            return
        from fedlrm.reporting import plot_clustering

        distances = server_state["server.distances"].numpy()
        assignment = server_state["server.assignment"].tolist()
        candidates = server_state["server.silhouette"].tolist()
        chosen = int(max(assignment)) + 1
        record = {
            "chosen_k": chosen,
            "silhouette_by_k": {int(k): s for k, s in candidates},
            "cluster_of_client": {c: a for c, a in enumerate(assignment)},
            "distance_matrix": [[None if np.isnan(d) else float(d) for d in row] for row in distances],
            "distance": "1 - cosine similarity of LoRA B matrices, per adapted layer, averaged over layers",
        }
        (run_dir / "clustering.json").write_text(json.dumps(record, indent=2))
        plot_clustering(run_dir / "clustering.png", distances, assignment, candidates)


def cluster_clients(features: list[list[torch.Tensor]], max_clusters: int):
    """Agglomerative clustering (average linkage) of clients on precomputed distances.

    `features[i]` are client i's matrices, one per layer. The distance of two clients is
    the mean over layers of 1 - cosine similarity of their flattened matrices. k is the
    candidate in [2, max_clusters] with the best silhouette score (the smaller k on a tie).
    Returns the distance matrix, [(k, silhouette)] and labels numbered by first client.
    """
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import silhouette_score

    n = len(features)
    per_layer = []
    for layer in range(len(features[0])):
        flat = torch.stack([f[layer].flatten().double() for f in features])
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        per_layer.append(1.0 - unit @ unit.t())
    distances = torch.stack(per_layer).mean(0).clamp_min(0).numpy()
    np.fill_diagonal(distances, 0.0)
    distances = (distances + distances.T) / 2
    if n < 3:  # silhouette needs 2 <= k <= n - 1: every client is its own cluster
        return distances, [], np.arange(n)
    candidates, best = [], None
    for k in range(2, min(max_clusters, n - 1) + 1):
        labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(distances)
        score = float(silhouette_score(distances, labels, metric="precomputed"))
        candidates.append((k, score))
        if best is None or score > best[0] + 1e-12:
            best = (score, labels)
    order = {label: i for i, label in enumerate(dict.fromkeys(best[1].tolist()))}
    return distances, candidates, np.array([order[label] for label in best[1]])
