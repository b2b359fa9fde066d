"""F3OCUS (arXiv 2411.11912): client-specific layer selection from NTK importance and diversity.

- Client: scores each adapted transformer block l by the principal eigenvalue of its
  layer-wise empirical NTK on a batch, i.e. of J_l J_l^T with J_l the per-sample
  Jacobian of the logits with respect to block l's adapter weights (= the squared
  largest singular value of J_l), normalised over blocks: S_l = lambda_l / sum_k lambda_k.
  It sends these scores with its update; nothing else about its data.
- Server, without data: picks for every client a subset of `f3ocus.budget` blocks,
  trading total importance (sum of the clients' scores of their chosen blocks) against
  inter-client diversity (mean pairwise Hamming distance of the clients' choices), as a
  two-objective problem solved by a pymoo meta-heuristic (`f3ocus.optimizer`: NSGA-II or
  SMS-EMOA). The Pareto front over every candidate evaluated is recorded; the chosen
  point is the one closest to the ideal point after min-max normalisation of the front.
- Clients train only their selected blocks; the server averages each block's adapter over
  the clients that trained it, weighted by samples. Round 1 uses a selection made with
  uniform scores (none exist yet); round r + 1 uses the scores uploaded in round r.

No public code exists; every choice above is ours and listed in the README.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from fedlrm.adapters import AdaptedLinear, adapter_parameters, block_index, get_state, set_state
from fedlrm.algorithms.base import Algorithm, ServerState, State, Upload, weighted_mean
from fedlrm.algorithms.registry import register
from fedlrm.config import at_least_one, one_of
from fedlrm.errors import ConfigError
from fedlrm.seeding import derive_seed

MASK, SCORES = "f3ocus.mask", "f3ocus.scores"


def block_of(key: str) -> int:
    found = block_index(key)
    if found is None:
        raise ValueError(f"F3OCUS selects transformer blocks, but adapter {key} is in none")
    return found


def blocks(keys) -> list[int]:
    return sorted({block_of(k) for k in keys})


def ntk_scores(model, images: torch.Tensor, classes: list[int] | None = None) -> torch.Tensor:
    """Normalised principal eigenvalue of each block's empirical NTK on `images`, over the
    logits of `classes` (all if None)."""
    from torch.func import functional_call, jacrev

    params = {k: p.detach() for k, p in adapter_parameters(model).items()}
    model.eval()

    def logits(p):
        out = functional_call(model, p, (images,))
        return out if classes is None else out[:, classes]

    with warnings.catch_warnings():  # vmap over CPU attention's backward works, only without a fast rule
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        jac = jacrev(logits)(params)  # name -> (n, K, *shape)
    eig = []
    for b in blocks(params):
        J = torch.cat([jac[k].reshape(jac[k].shape[0] * jac[k].shape[1], -1) for k in params if block_of(k) == b],
                      dim=1)
        eig.append(torch.linalg.matrix_norm(J.double(), ord=2) ** 2)  # lambda_max(J J^T) = sigma_max(J)^2
    eig = torch.stack(eig)
    return eig / eig.sum() if eig.sum() > 0 else torch.full_like(eig, 1.0 / len(eig))


def objectives(masks: np.ndarray, scores: np.ndarray, budget: int) -> tuple[float, float]:
    """(importance, diversity) of a selection: masks (clients, blocks) of 0/1."""
    importance = float((masks * scores).sum() / len(masks))
    n = len(masks)
    if n < 2:
        return importance, 0.0
    hamming = np.abs(masks[:, None, :] - masks[None, :, :]).sum(-1)
    diversity = float(hamming[np.triu_indices(n, 1)].mean() / (2 * budget))
    return importance, diversity


def select_layers(scores: np.ndarray, budget: int, optimizer: str, population: int, generations: int,
                  seed: int) -> dict:
    """Multi-objective choice of `budget` blocks per client (pymoo); see the module docstring."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.algorithms.moo.sms import SMSEMOA
    from pymoo.core.crossover import Crossover
    from pymoo.core.mutation import Mutation
    from pymoo.core.problem import Problem
    from pymoo.core.sampling import Sampling
    from pymoo.optimize import minimize
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    n, L = scores.shape
    budget = min(budget, L)
    archive: dict[bytes, np.ndarray] = {}
    rng = np.random.default_rng(seed)  # every random choice of the operators, in call order

    def repair(x: np.ndarray) -> np.ndarray:
        """Exactly `budget` blocks per client: drop the least, add the most important."""
        x = x.reshape(n, L).copy()
        for c in range(n):
            chosen = np.flatnonzero(x[c])
            if len(chosen) > budget:
                x[c, chosen[np.argsort(scores[c, chosen], kind="stable")[: len(chosen) - budget]]] = 0
            elif len(chosen) < budget:
                free = np.flatnonzero(x[c] == 0)
                x[c, free[np.argsort(-scores[c, free], kind="stable")[: budget - len(chosen)]]] = 1
        return x.reshape(-1)

    class Selection(Problem):
        def __init__(self):
            super().__init__(n_var=n * L, n_obj=2, xl=0, xu=1, vtype=bool)

        def _evaluate(self, X, out, *args, **kwargs):
            F = []
            for x in X.astype(np.int64):
                imp, div = objectives(x.reshape(n, L), scores, budget)
                F.append([-imp, -div])
                archive.setdefault(x.tobytes(), np.array([-imp, -div]))
            out["F"] = np.array(F)

    class Sample(Sampling):
        def _do(self, problem, n_samples, **kwargs):
            X = np.zeros((n_samples, n * L), dtype=bool)
            for i in range(n_samples):
                for c in range(n):
                    X[i, c * L + rng.permutation(L)[:budget]] = True
            return X

    class Cross(Crossover):  # uniform crossover of whole client rows, then repair
        def __init__(self):
            super().__init__(2, 2)

        def _do(self, problem, X, **kwargs):
            _, n_matings, _ = X.shape
            Y = X.copy()
            for k in range(n_matings):
                swap = np.repeat(rng.random(n) < 0.5, L)
                Y[0, k, swap], Y[1, k, swap] = X[1, k, swap], X[0, k, swap]
                Y[0, k], Y[1, k] = repair(Y[0, k].astype(int)), repair(Y[1, k].astype(int))
            return Y.astype(bool)

    class Mutate(Mutation):  # per client, with prob 1/n: swap a chosen block for an unchosen one
        def _do(self, problem, X, **kwargs):
            X = X.copy().reshape(len(X), n, L)
            for x in X:
                for c in range(n):
                    on, off = np.flatnonzero(x[c]), np.flatnonzero(~x[c])
                    if rng.random() < 1.0 / n and len(on) and len(off):
                        x[c, rng.choice(on)], x[c, rng.choice(off)] = False, True
            return X.reshape(len(X), -1)

    operators = dict(pop_size=population, sampling=Sample(), crossover=Cross(), mutation=Mutate(),
                     eliminate_duplicates=True)
    algorithm = NSGA2(**operators) if optimizer == "nsga2" else SMSEMOA(**operators)
    minimize(Selection(), algorithm, ("n_gen", generations), seed=seed % (2**31), verbose=False)
    X = np.array([np.frombuffer(k, dtype=np.int64) for k in archive])
    F = np.array(list(archive.values()))
    front = NonDominatedSorting().do(F, only_non_dominated_front=True)
    front = front[np.unique(F[front], axis=0, return_index=True)[1]]  # one candidate per front point
    front = front[np.lexsort((F[front, 1], F[front, 0]))]
    span = F[front].max(0) - F[front].min(0)
    normalised = (F[front] - F[front].min(0)) / np.where(span > 0, span, 1)
    best = front[int(np.argmin(np.linalg.norm(normalised, axis=1)))]
    return {"masks": X[best].reshape(n, L), "front": -F[front], "chosen": -F[best], "evaluated": -F,
            "evaluated_masks": X}


@dataclass
class F3OCUSSettings:
    budget: int = 2  # transformer blocks each client trains per round
    optimizer: str = "nsga2"  # pymoo meta-heuristic: nsga2 | smsemoa
    population: int = 40
    generations: int = 30
    ntk_batch: int = 8  # images per client for the layer-wise NTK


@dataclass
class Selections:
    """The server's record: the selection clients train with next, and how it was chosen."""

    masks: torch.Tensor  # (clients, blocks) 0/1: the blocks each client trains in the next round
    scores: torch.Tensor  # (clients, blocks): each client's latest scores (uniform until it sent some)
    fronts: dict[int, torch.Tensor] = field(default_factory=dict)  # round -> Pareto front (importance, diversity)
    chosen: dict[int, torch.Tensor] = field(default_factory=dict)  # round -> the point chosen from it


@register
class F3OCUS(Algorithm):
    name = "f3ocus"
    Settings = F3OCUSSettings
    Record = Selections
    quick_settings = {"budget": 1, "population": 8, "generations": 3, "ntk_batch": 4}
    aggregates_by_mean = False  # it looks at each upload

    @classmethod
    def check(cls, settings, cfg):
        one_of("f3ocus.optimizer", settings.optimizer, ("nsga2", "smsemoa"))
        for key in ("budget", "population", "generations", "ntk_batch"):
            at_least_one(f"f3ocus.{key}", getattr(settings, key))
        layers = cfg.model.target_layers
        if cfg.algorithm == cls.name and layers and settings.budget > len(layers):  # the rest: check_model
            raise ConfigError(f"f3ocus.budget={settings.budget} is more than the {len(layers)} block(s) of "
                              f"model.target_layers={list(layers)}; use f3ocus.budget at most {len(layers)}")

    def check_model(self, adapted_modules):
        adapted = blocks(adapted_modules)
        if self.settings.budget > len(adapted):
            raise ConfigError(
                f"f3ocus.budget={self.settings.budget} is more than the {len(adapted)} transformer block(s) that "
                f"carry adapters (blocks {adapted}, from model.target_layers={list(self.cfg.model.target_layers)}); "
                f"use f3ocus.budget at most {len(adapted)}, or adapt more blocks")

    def make_layer(self, linear, layout):
        return AdaptedLinear(linear, {"global": self.expert(linear, self.cfg.adapter.rank)})

    # ----- server -----------------------------------------------------------------------
    def select(self, scores: np.ndarray, for_round: int, record: Selections | None) -> Selections:
        """The selection clients train with in `for_round`, from the scores known now."""
        f = self.settings
        picked = select_layers(scores, f.budget, f.optimizer, f.population, f.generations,
                               derive_seed(self.cfg.seed, "f3ocus", for_round))
        fronts = {**(record.fronts if record else {}), for_round: torch.from_numpy(picked["front"])}
        chosen = {**(record.chosen if record else {}), for_round: torch.from_numpy(picked["chosen"])}
        return Selections(torch.from_numpy(picked["masks"]), torch.from_numpy(scores), fronts, chosen)

    def init_server(self, weights: State) -> ServerState:
        # the clients that train: a new client (data.new_clients) must not shape their selection
        n, L = self.cfg.data.training_clients, len(blocks(weights))
        return ServerState(weights, self.select(np.full((n, L), 1.0 / L), 1, None))

    def message_for(self, state: ServerState, client_id: int, server_round: int) -> State:
        return {**state.weights, MASK: state.record.masks[client_id].clone()}

    def newcomer_message(self, state: ServerState, server_round: int) -> State:
        """The weights and, as a newcomer's blocks, the `f3ocus.budget` blocks of highest mean score
        over the clients (the lower block among equals): the server has no scores of a newcomer, so it
        picks what is important to the federation. The newcomer fine-tunes those blocks' LoRA."""
        mean = state.record.scores.double().mean(0)
        chosen = torch.argsort(-mean, stable=True)[: self.settings.budget]
        mask = torch.zeros_like(state.record.masks[0])
        mask[chosen] = 1
        return {**state.weights, MASK: mask}

    def aggregate(self, state: ServerState, uploads, server_round: int) -> ServerState:
        scores = state.record.scores.numpy().copy()
        for u in uploads:
            scores[u.client_id] = u.state[SCORES].numpy()
        weights = weighted_mean([Upload(u.client_id, {k: v for k, v in u.state.items() if k != SCORES},
                                        u.num_examples) for u in uploads])
        return ServerState({**state.weights, **weights}, self.select(scores, server_round + 1, state.record))

    # ----- client -----------------------------------------------------------------------
    def receive(self, model, ctx) -> None:
        received = ctx.received
        set_state(model, {k: v for k, v in received.items() if k != MASK})
        if MASK not in received:
            return
        chosen = {b for b, on in zip(blocks(adapter_parameters(model)), received[MASK].tolist()) if on}
        for key, p in adapter_parameters(model).items():
            p.requires_grad_(block_of(key) in chosen)  # frozen blocks cost no backward below the lowest chosen

    def upload(self, model, shared_keys, ctx) -> State:
        trained = [k for k, p in adapter_parameters(model).items() if p.requires_grad]
        return get_state(model, trained)

    def client_report(self, model, train_set, ctx) -> State:
        images, _ = next(train_set.batches(self.settings.ntk_batch))
        device = next(model.buffers()).device
        # The logits of the classes this client holds: the Jacobian costs one backward pass per
        # image and logit, and with 100 classes of which a client holds 10 the other 90 made it
        # 10x slower (Caltech101) while they are outputs the client's data never asks for.
        with torch.enable_grad():
            return {SCORES: ntk_scores(model, images.to(device), train_set.classes).float().cpu()}

    def report_schema(self, model) -> dict:
        return {SCORES: ((len(blocks(adapter_parameters(model))),), torch.float32)}

    # ----- records ----------------------------------------------------------------------
    def write_report(self, run_dir, state: ServerState) -> None:
        record = state.record
        rounds = sorted(record.chosen)
        report = {
            "objectives": ["importance: mean over clients of the summed scores of their blocks",
                           "diversity: mean pairwise Hamming distance of client selections / (2 budget)"],
            "blocks": blocks(k for k in state.weights if ".experts.global." in k),
            "rounds": {r: {"front": record.fronts[r].tolist(), "chosen": record.chosen[r].tolist()} for r in rounds},
            "last_scores": record.scores.tolist(),
            "next_masks": record.masks.tolist(),
        }
        (run_dir / "selection.json").write_text(json.dumps(report, indent=2))
        plot_selection(run_dir / "selection.png", record.fronts[rounds[-1]].numpy(), record.chosen[rounds[-1]].numpy(),
                       record.masks.numpy())


def plot_selection(path, front, chosen, masks) -> None:
    """F3OCUS: the last Pareto front with its chosen point, and who trains which block next."""
    from fedlrm.reporting import MaxNLocator, plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(front[:, 0], front[:, 1], marker="o", linestyle="-", label="Pareto front (evaluated candidates)")
    axes[0].scatter([chosen[0]], [chosen[1]], color="tab:red", zorder=3, s=60, label="chosen")
    axes[0].set(xlabel="importance (mean summed NTK score)", ylabel="inter-client diversity", title="layer selection")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].imshow(masks, cmap="Blues", aspect="auto", vmin=0, vmax=1)
    axes[1].set(xlabel="transformer block", ylabel="client", title="blocks each client trains next")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
