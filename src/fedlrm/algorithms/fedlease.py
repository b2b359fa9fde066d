"""FedLEASE (arXiv 2509.15087): clustered LoRA experts with adaptive top-M routing.

1. Warm-up (`fedlease.warmup_rounds`): each client trains one purely local LoRA and
   uploads it; the server keeps each client's latest one and sends nothing back.
2. At the end of warm-up the server clusters the clients on their LoRA B matrices
   (cosine distance per layer, averaged over layers; agglomerative clustering with
   average linkage on the precomputed distances; k in [2, max_clusters] by silhouette)
   and starts one expert per cluster.
3. Then every client receives all M experts and its cluster index, trains its own
   cluster's expert and its router (`TopMRouter`), and uploads that expert; the server
   averages each expert over its cluster's uploads.

`fedlease.variant` says how, in the clustered phase:

- `official` (the default) as the official code (lei-wang-link/FedLEASE) does it: the
  warm-up LoRA and every expert have rank `fedlease.expert_rank` (4) and alpha
  `fedlease.expert_alpha` (16) whatever `adapter.rank` says; routers are shared within a
  cluster (uploaded beside the expert, averaged over the cluster's uploads, sent back to
  its members; the server keeps them in its record, one per cluster); until a cluster's
  expert has been averaged once (the first clustered round), a member receives its own
  warm-up LoRA in its own slot and fresh experts (B = 0) in the others; plain means.
- `weighted` (fedlrm's FedLEASE before issue 17): experts of `adapter.rank` and
  `adapter.alpha`; routers private to their client; every member of a cluster starts from
  the cluster's sample-weighted mean warm-up LoRA; sample-weighted means.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fedlrm.adapters import (AdaptedLinear, LoRAExpert, TopMRouter, adapted_layers, adapter_parameters, get_state,
                             set_state)
from fedlrm.algorithms.base import Algorithm, ServerState, State, Upload, weighted_mean
from fedlrm.algorithms.registry import register
from fedlrm.config import at_least_one, finite_positive, one_of
from fedlrm.errors import ConfigError
from fedlrm.seeding import derive_seed

EXPERT = re.compile(r"\.experts\.e(\d+)\.")
LOCAL = ".experts.local."
ROUTER = ".mixer."  # a router's weights: <layer>.mixer.proj.weight
CLUSTER = "fedlease.cluster"  # the one non-weight entry of a client's message
VARIANTS = ("official", "weighted")


@dataclass
class FedLEASESettings:
    warmup_rounds: int = 5  # rounds of purely local LoRA before clustering (official code: 5)
    max_clusters: int = 4  # k is chosen by silhouette in [2, max_clusters] (official code: 4)
    # official: as the official code (shared routers, plain means, own warm-up LoRA in its slot, rank-4
    # experts); weighted: fedlrm's before issue 17 (private routers, sample-weighted means, adapter.rank)
    variant: str = "official"
    expert_rank: int = 4  # official variant: rank of the warm-up LoRA and of every expert (official code: 4)
    expert_alpha: float = 16.0  # official variant: their alpha (official code: 16)


@dataclass
class Clustering:
    """The server's record: warm-up LoRAs, then who belongs where and why, and the clusters' routers."""

    examples: torch.Tensor  # (clients,) training examples behind each client's latest warm-up LoRA; 0: none yet
    #: client -> its latest warm-up LoRA: until clustering (weighted); official: until its cluster's
    #: expert is first averaged, as the client receives it in its own slot until then
    warmup: dict[int, State] = field(default_factory=dict)
    assignment: torch.Tensor | None = None  # (clients,) cluster of each client, once clustered
    distances: torch.Tensor | None = None  # (clients, clients) LoRA-B distances; NaN for clients never seen
    silhouette: list[tuple[int, float]] = field(default_factory=list)  # (k, silhouette score) of each candidate
    #: official variant: cluster -> its router, the plain mean over the cluster's latest uploads
    #: (a cluster that has not trained yet has none: its members start from fresh routers)
    routers: dict[int, State] = field(default_factory=dict)


@register
class FedLEASE(Algorithm):
    name = "fedlease"
    compare_variants = ("variant=weighted",)  # compare shows the official code's variant and fedlrm's earlier one
    Settings = FedLEASESettings
    Record = Clustering
    quick_settings = {"warmup_rounds": 1, "max_clusters": 3}
    aggregates_by_mean = False  # it looks at each upload
    has_global_model = False  # one model per cluster, none for everyone

    @classmethod
    def check(cls, settings, cfg):
        at_least_one("fedlease.warmup_rounds", settings.warmup_rounds)
        one_of("fedlease.variant", settings.variant, VARIANTS)
        at_least_one("fedlease.expert_rank", settings.expert_rank)
        finite_positive("fedlease.expert_alpha", settings.expert_alpha)
        # Only for a FedLEASE run: the other methods' runs carry this section with its defaults.
        if cfg.algorithm == cls.name and settings.warmup_rounds >= cfg.train.rounds:
            raise ConfigError(f"fedlease.warmup_rounds={settings.warmup_rounds} leaves no clustered round in "
                              f"train.rounds={cfg.train.rounds} (clients cluster after the warm-up); use "
                              f"fedlease.warmup_rounds at most {cfg.train.rounds - 1} or more train.rounds")
        if settings.max_clusters < 2:
            raise ConfigError(f"fedlease.max_clusters must be at least 2, got {settings.max_clusters}")

    @property
    def official(self) -> bool:
        return self.settings.variant == "official"

    # ----- model ------------------------------------------------------------------------
    def layout_of(self, message: State) -> int:
        """The number of cluster experts; 0 is the warm-up layout, one local LoRA."""
        return len({int(m.group(1)) for k in message if (m := EXPERT.search(k))})

    def make_layer(self, linear, layout: int):
        if not layout:
            return AdaptedLinear(linear, {"local": self.lora(linear)})
        experts = {f"e{j}": self.lora(linear) for j in range(layout)}
        return AdaptedLinear(linear, experts, TopMRouter(linear.in_features, layout))

    def lora(self, linear) -> LoRAExpert:
        """A warm-up LoRA or a cluster expert: of fedlease.expert_rank and expert_alpha (official),
        else of adapter.rank and adapter.alpha."""
        if not self.official:
            return self.expert(linear, self.cfg.adapter.rank)
        s = self.settings
        return LoRAExpert(linear.in_features, linear.out_features, s.expert_rank, s.expert_alpha,
                          self.cfg.adapter.dropout)

    def is_shared(self, key: str) -> bool:
        return EXPERT.search(key) is not None or (self.official and ROUTER in key)

    def private_init_key(self, client_id: int) -> object:
        # Warm-up LoRAs start alike, so that their B matrices differ by what the data taught
        # them rather than by their random A (the clustering compares B alone).
        return "warm-up"

    # ----- messages and client side -----------------------------------------------------
    def message_for(self, state: ServerState, client_id: int, server_round: int) -> State:
        message = dict(state.weights)
        record = state.record
        if record.assignment is None:
            return message
        own = int(record.assignment[client_id])
        if self.official:
            warm = record.warmup.get(client_id)  # kept while its cluster has not trained
            if warm is not None:
                message.update({k.replace(LOCAL, f".experts.e{own}."): v for k, v in warm.items()})
            message.update(self.router_of(state, own, client_id))
        message[CLUSTER] = torch.tensor(own)
        return message

    def router_of(self, state: ServerState, cluster: int, who: object) -> State:
        """Official variant: the router a member of `cluster` receives, the cluster's, or while the
        cluster has none, a fresh one drawn from (run seed, `who`) as the official code's clients
        start theirs."""
        if cluster in state.record.routers:
            return dict(state.record.routers[cluster])
        return fresh_routers(state.weights, derive_seed(self.cfg.seed, "fedlease", "router", who))

    def newcomer_message(self, state: ServerState, server_round: int) -> State:
        """All cluster experts, and as the newcomer's cluster the largest one (the lowest index among
        equals): the rule clustering applies to clients it has no warm-up LoRA of, as the server has
        none of a newcomer; in the official variant that cluster's router too. It then trains its
        router (`newcomer_trains`), the experts staying as the server holds them."""
        message = dict(state.weights)
        if state.record.assignment is not None:
            own = int(torch.bincount(state.record.assignment).argmax())
            if self.official:
                message.update(self.router_of(state, own, "newcomer"))
            message[CLUSTER] = torch.tensor(own)
        return message

    def newcomer_trains(self, keys: list[str]) -> list[str]:
        return [k for k in keys if ROUTER in k] or super().newcomer_trains(keys)

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
        # official: the router too (shared keys hold routers only then)
        return get_state(model, [k for k in shared_keys if mark in k or ROUTER in k])

    # ----- server side ------------------------------------------------------------------
    def init_server(self, weights: State) -> ServerState:
        return ServerState(weights, Clustering(torch.zeros(self.cfg.data.training_clients, dtype=torch.int64)))

    def aggregate(self, state: ServerState, uploads, server_round: int) -> ServerState:
        record = state.record
        if record.assignment is not None:  # each expert over the uploads of its cluster
            if not self.official:
                return ServerState({**state.weights, **weighted_mean(uploads)}, record)
            return self.aggregate_clusters(state, uploads)
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

    def aggregate_clusters(self, state: ServerState, uploads) -> ServerState:
        """Official variant: expert j and cluster j's router become the plain means over cluster j's
        uploads; its members' warm-up LoRAs are then done with."""
        record = state.record
        assignment = record.assignment.tolist()
        weights, routers, warmup = dict(state.weights), dict(record.routers), dict(record.warmup)
        for j in sorted({assignment[u.client_id] for u in uploads}):
            mean = plain_mean([u.state for u in uploads if assignment[u.client_id] == j])
            weights.update({k: v for k, v in mean.items() if ROUTER not in k})
            routers[j] = {k: v for k, v in mean.items() if ROUTER in k}
            for c in [c for c in warmup if assignment[c] == j]:
                del warmup[c]
        return ServerState(weights, replace(record, warmup=warmup, routers=routers))

    def start_clusters(self, record: Clustering) -> tuple[State, Clustering]:
        """Cluster the clients on their warm-up LoRAs and start one expert per cluster: fresh ones
        (official; members receive their own warm-up LoRA in their slot), or the sample-weighted
        mean of each cluster's warm-up LoRAs (weighted)."""
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
            if self.official:
                seed = derive_seed(self.cfg.seed, "fedlease", "fresh expert", j)
                experts.update(fresh_experts(loras[seen[0]], j, seed, self.settings.expert_alpha))
                continue
            members = [c for c in seen if assignment[c] == j]
            weights = torch.tensor([float(record.examples[c]) for c in members], dtype=torch.float64)
            weights /= weights.sum()
            for key in loras[seen[0]]:
                mean = sum(w * loras[c][key].double() for w, c in zip(weights, members))
                experts[key.replace(LOCAL, f".experts.e{j}.")] = mean.to(loras[seen[0]][key].dtype)
        full = np.full((n, n), np.nan)
        full[np.ix_(seen, seen)] = distances
        # weighted: the warm-up LoRAs have served their purpose; the record keeps what explains the clusters
        warmup = dict(loras) if self.official else {}
        return experts, Clustering(record.examples, warmup, torch.from_numpy(assignment), torch.from_numpy(full),
                                   [(int(k), float(s)) for k, s in candidates])

    def example_message(self, state: ServerState, private: State, client_id: int) -> State:
        """After clustering: one expert per cluster (here the client's warm-up LoRA, as the client
        receives it in its own slot, or as the weighted variant starts experts from members' LoRAs),
        the client's cluster and, official, fresh routers."""
        message = {k.replace(LOCAL, f".experts.e{j}."): v.clone() for j in range(self.settings.max_clusters)
                   for k, v in private.items() if LOCAL in k}
        if self.official:
            message.update(fresh_routers(message, derive_seed(self.cfg.seed, "fedlease", "router", client_id)))
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
            "variant": self.settings.variant,
            "chosen_k": int(max(assignment)) + 1,
            "silhouette_by_k": {int(k): s for k, s in record.silhouette},
            "cluster_of_client": {c: a for c, a in enumerate(assignment)},
            "distance_matrix": [[None if np.isnan(d) else float(d) for d in row] for row in distances],
            "distance": "1 - cosine similarity of LoRA B matrices, per adapted layer, averaged over layers",
        }
        (run_dir / "clustering.json").write_text(json.dumps(record_json, indent=2))
        plot_clustering(run_dir / "clustering.png", distances, assignment, record.silhouette)


def plain_mean(states: list[State]) -> State:
    """The unweighted mean of each key over the states that hold it."""
    return weighted_mean([Upload(-1, s, 1.0) for s in states])


def layer_shapes(state: State) -> dict[str, tuple[int, int, int]]:
    """(d_in, d_out, rank) of each adapted layer that `state` holds a LoRA of (any expert's A and B)."""
    a = {k.split(".experts.")[0]: v.shape for k, v in state.items() if ".experts." in k and k.endswith(".A")}
    b = {k.split(".experts.")[0]: v.shape for k, v in state.items() if ".experts." in k and k.endswith(".B")}
    return {layer: (a[layer][1], b[layer][0], a[layer][0]) for layer in sorted(a)}


def fresh_experts(lora: State, cluster: int, seed: int, alpha: float) -> State:
    """Expert `cluster` freshly initialised as a LoRA is (random A, B = 0), shaped as the warm-up LoRA
    `lora`, from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for layer, (d_in, d_out, rank) in layer_shapes(lora).items():
        expert = LoRAExpert(d_in, d_out, rank, alpha)
        expert.reset_parameters(generator)
        dtype = lora[f"{layer}{LOCAL}A"].dtype
        out[f"{layer}.experts.e{cluster}.A"] = expert.A.detach().to(dtype)
        out[f"{layer}.experts.e{cluster}.B"] = expert.B.detach().to(dtype)
    return out


def fresh_routers(experts: State, seed: int) -> State:
    """A freshly initialised router for every layer that `experts` (cluster experts e0..e{M-1}) adapt,
    over those M experts, from `seed`."""
    n_experts = len({int(m.group(1)) for k in experts if (m := EXPERT.search(k))})
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for layer, (d_in, _, _) in layer_shapes(experts).items():
        router = TopMRouter(d_in, n_experts)
        router.reset_parameters(generator)
        out[f"{layer}.mixer.proj.weight"] = router.proj.weight.detach()
    return out


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
