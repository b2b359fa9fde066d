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

Where the issue and docs/DESIGN.md are silent this follows the official code, except as
noted in the README (routers stay private; sample-weighted rather than plain means).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from fedlrm.adapters import AdaptedLinear, TopMRouter, adapted_layers, adapter_parameters, get_state, set_state
from fedlrm.algorithms.base import Algorithm, ServerState, State, weighted_mean
from fedlrm.algorithms.registry import register
from fedlrm.config import at_least_one
from fedlrm.errors import ConfigError

EXPERT = re.compile(r"\.experts\.e(\d+)\.")
LOCAL = ".experts.local."
CLUSTER = "fedlease.cluster"  # the one non-weight entry of a client's message


@dataclass
class FedLEASESettings:
    warmup_rounds: int = 5  # rounds of purely local LoRA before clustering (official code: 5)
    max_clusters: int = 4  # k is chosen by silhouette in [2, max_clusters] (official code: 4)


@dataclass
class Clustering:
    """The server's record: warm-up LoRAs until it clusters, then who belongs where and why."""

    examples: torch.Tensor  # (clients,) training examples behind each client's latest warm-up LoRA; 0: none yet
    warmup: dict[int, State] = field(default_factory=dict)  # client -> its latest warm-up LoRA, until clustering
    assignment: torch.Tensor | None = None  # (clients,) cluster of each client, once clustered
    distances: torch.Tensor | None = None  # (clients, clients) LoRA-B distances; NaN for clients never seen
    silhouette: list[tuple[int, float]] = field(default_factory=list)  # (k, silhouette score) of each candidate


@register
class FedLEASE(Algorithm):
    name = "fedlease"
    Settings = FedLEASESettings
    Record = Clustering
    quick_settings = {"warmup_rounds": 1, "max_clusters": 3}
    aggregates_by_mean = False  # it looks at each upload
    has_global_model = False  # one model per cluster, none for everyone

    @classmethod
    def check(cls, settings, cfg):
        at_least_one("fedlease.warmup_rounds", settings.warmup_rounds)
        # Only for a FedLEASE run: the other methods' runs carry this section with its defaults.
        if cfg.algorithm == cls.name and settings.warmup_rounds >= cfg.train.rounds:
            raise ConfigError(f"fedlease.warmup_rounds={settings.warmup_rounds} leaves no clustered round in "
                              f"train.rounds={cfg.train.rounds} (clients cluster after the warm-up); use "
                              f"fedlease.warmup_rounds at most {cfg.train.rounds - 1} or more train.rounds")
        if settings.max_clusters < 2:
            raise ConfigError(f"fedlease.max_clusters must be at least 2, got {settings.max_clusters}")

    # ----- model ------------------------------------------------------------------------
    def layout_of(self, message: State) -> int:
        """The number of cluster experts; 0 is the warm-up layout, one local LoRA."""
        return len({int(m.group(1)) for k in message if (m := EXPERT.search(k))})

    def make_layer(self, linear, layout: int):
        rank = self.cfg.adapter.rank
        if not layout:
            return AdaptedLinear(linear, {"local": self.expert(linear, rank)})
        experts = {f"e{j}": self.expert(linear, rank) for j in range(layout)}
        return AdaptedLinear(linear, experts, TopMRouter(linear.in_features, layout))

    def is_shared(self, key: str) -> bool:
        return EXPERT.search(key) is not None

    def private_init_key(self, client_id: int) -> object:
        # Warm-up LoRAs start alike, so that their B matrices differ by what the data taught
        # them rather than by their random A (the clustering compares B alone).
        return "warm-up"

    # ----- messages and client side -----------------------------------------------------
    def message_for(self, state: ServerState, client_id: int, server_round: int) -> State:
        message = super().message_for(state, client_id, server_round)
        if state.record.assignment is not None:
            message[CLUSTER] = state.record.assignment[client_id].clone()
        return message

    def newcomer_message(self, state: ServerState, server_round: int) -> State:
        """All cluster experts, and as the newcomer's cluster the largest one (the lowest index among
        equals): the rule clustering applies to clients it has no warm-up LoRA of, as the server has
        none of a newcomer. It then trains its router (the default `newcomer_trains`), the experts
        staying as the server holds them."""
        message = dict(state.weights)
        if state.record.assignment is not None:
            message[CLUSTER] = torch.bincount(state.record.assignment).argmax()
        return message

    def receive(self, model, ctx) -> None:
        set_state(model, {k: v for k, v in ctx.received.items() if k != CLUSTER})
        if CLUSTER not in ctx.received:
            return
        own = int(ctx.received[CLUSTER])
        for _, layer in adapted_layers(model):
            layer.mixer.own.fill_(own)
            for name, expert in layer.experts.items():
                expert.requires_grad_(name == f"e{own}")  # the other clusters' experts stay fixed

    def upload(self, model, shared_keys: list[str], ctx) -> State:
        if CLUSTER not in ctx.received:  # warm-up: the local LoRA, for clustering
            return get_state(model, [k for k in adapter_parameters(model) if LOCAL in k])
        mark = f".experts.e{int(ctx.received[CLUSTER])}."
        return get_state(model, [k for k in shared_keys if mark in k])

    # ----- server side ------------------------------------------------------------------
    def init_server(self, weights: State) -> ServerState:
        return ServerState(weights, Clustering(torch.zeros(self.cfg.data.training_clients, dtype=torch.int64)))

    def aggregate(self, state: ServerState, uploads, server_round: int) -> ServerState:
        record = state.record
        if record.assignment is not None:  # each expert over the uploads of its cluster
            return ServerState({**state.weights, **weighted_mean(uploads)}, record)
        examples = record.examples.clone()
        warmup = dict(record.warmup)
        for u in uploads:
            examples[u.client_id] = u.num_examples
            warmup[u.client_id] = dict(u.state)
        record = Clustering(examples, warmup)
        if server_round < self.settings.warmup_rounds:
            return ServerState(state.weights, record)
        experts, record = self.start_clusters(record)
        return ServerState({**state.weights, **experts}, record)

    def start_clusters(self, record: Clustering) -> tuple[State, Clustering]:
        """Cluster the clients on their warm-up LoRAs and start one expert per cluster."""
        n = self.cfg.data.training_clients  # new clients are none of the server's (data.new_clients)
        loras = record.warmup
        seen = sorted(loras)
        b_keys = sorted(k for k in loras[seen[0]] if k.endswith(f"{LOCAL}B"))
        features = [[loras[c][k] for k in b_keys] for c in seen]
        distances, candidates, labels = cluster_clients(features, self.settings.max_clusters)
        assignment = np.zeros(n, dtype=np.int64)
        assignment[seen] = labels
        if len(seen) < n:  # never sampled during warm-up: join the largest cluster
            assignment[[c for c in range(n) if c not in seen]] = np.bincount(labels).argmax()
        experts = {}
        for j in range(int(labels.max()) + 1):
            members = [c for c in seen if assignment[c] == j]
            weights = torch.tensor([float(record.examples[c]) for c in members], dtype=torch.float64)
            weights /= weights.sum()
            for key in loras[seen[0]]:
                mean = sum(w * loras[c][key].double() for w, c in zip(weights, members))
                experts[key.replace(LOCAL, f".experts.e{j}.")] = mean.to(loras[seen[0]][key].dtype)
        full = np.full((n, n), np.nan)
        full[np.ix_(seen, seen)] = distances
        # The warm-up LoRAs have served their purpose; the record keeps what explains the clusters.
        return experts, Clustering(record.examples, {}, torch.from_numpy(assignment), torch.from_numpy(full),
                                   [(int(k), float(s)) for k, s in candidates])

    def example_message(self, state: ServerState, private: State, client_id: int) -> State:
        """After clustering: one expert per cluster (here the client's warm-up LoRA, as the server
        starts them from members' LoRAs) and the client's cluster."""
        message = {k.replace(LOCAL, f".experts.e{j}."): v.clone() for j in range(self.settings.max_clusters)
                   for k, v in private.items() if LOCAL in k}
        message[CLUSTER] = torch.tensor(0)
        return message

    # ----- records ----------------------------------------------------------------------
    def client_groups(self, state: ServerState) -> dict[int, int] | None:
        assignment = state.record.assignment if state.record is not None else None
        return None if assignment is None else {c: int(a) for c, a in enumerate(assignment.tolist())}

    def write_report(self, run_dir, state: ServerState) -> None:
        record = state.record
        if record.assignment is None:
            return
        distances = record.distances.numpy()
        assignment = record.assignment.tolist()
        record_json = {
            "chosen_k": int(max(assignment)) + 1,
            "silhouette_by_k": {int(k): s for k, s in record.silhouette},
            "cluster_of_client": {c: a for c, a in enumerate(assignment)},
            "distance_matrix": [[None if np.isnan(d) else float(d) for d in row] for row in distances],
            "distance": "1 - cosine similarity of LoRA B matrices, per adapted layer, averaged over layers",
        }
        (run_dir / "clustering.json").write_text(json.dumps(record_json, indent=2))
        plot_clustering(run_dir / "clustering.png", distances, assignment, record.silhouette)


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


def plot_clustering(path, distances, assignment: list[int], candidates: list) -> None:
    """Distance heatmap (clients ordered by cluster), dendrogram and silhouette per k."""
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    from fedlrm.reporting import MaxNLocator, plt

    seen = [i for i in range(len(assignment)) if not np.isnan(distances[i, i])]
    d = distances[np.ix_(seen, seen)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    order = sorted(range(len(seen)), key=lambda i: (assignment[seen[i]], seen[i]))
    im = axes[0].imshow(d[np.ix_(order, order)], cmap="viridis")
    labels = [f"{seen[i]} (c{assignment[seen[i]]})" for i in order]
    axes[0].set_xticks(range(len(order)), labels, rotation=90, fontsize=7)
    axes[0].set_yticks(range(len(order)), labels, fontsize=7)
    axes[0].set_title("LoRA-B cosine distance (client, cluster)")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    if len(seen) >= 2:
        dendrogram(linkage(squareform(d, checks=False), method="average"), ax=axes[1],
                   labels=[str(c) for c in seen])
    axes[1].set(title="average-linkage dendrogram", xlabel="client", ylabel="distance")
    if candidates:
        ks, scores = zip(*candidates)
        axes[2].plot(ks, scores, marker="o")
        chosen = max(assignment) + 1
        axes[2].axvline(chosen, color="tab:red", linestyle="--", label=f"chosen k = {chosen}")
        axes[2].legend()
        axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].set(title="silhouette score by k", xlabel="k", ylabel="silhouette")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
