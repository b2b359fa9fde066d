"""F3OCUS (arXiv 2411.11912): client-specific layer selection from NTK importance and diversity.

- Unit (`f3ocus.unit`): what is selected, a transformer block (`block`: every adapted layer
  of the block together, the default) or an adapted linear layer (`layer`: e.g. the q_proj
  of block 2 alone).
- Client: scores each unit u by the principal eigenvalue of its layer-wise empirical NTK on
  a batch, i.e. of J_u J_u^T with J_u the per-sample Jacobian of the logits with respect to
  unit u's adapter weights (= the squared largest singular value of J_u), normalised over
  units: S_u = lambda_u / sum_k lambda_k. It sends these scores with its update; nothing
  else about its data.
- Server, without data: picks for every client c a subset of b_c units (its budget:
  `f3ocus.budget` for all, one per client in `f3ocus.budgets`, or drawn once from the run
  seed with `f3ocus.budget_distribution=uniform`), trading total importance (mean over
  clients of the summed scores of their chosen units) against inter-client diversity (mean
  over client pairs of the Hamming distance of their choices divided by b_c + b_d, the
  largest it can be), as a two-objective problem solved by a pymoo meta-heuristic
  (`f3ocus.optimizer`, one of OPTIMIZERS). Every candidate any of them evaluates has
  exactly b_c units for client c: budget-sized sampling, operators that keep row sizes,
  and a pymoo Repair run after sampling and after every mating, which the algorithms
  without constraint handling (MOEA/D) apply as well. The Pareto front over every candidate
  evaluated is recorded; the chosen point is the one closest to the ideal point after
  min-max normalisation of the front.
- Clients train only their selected units; the server averages each unit's adapter over
  the clients that trained it, weighted by samples. Round 1 uses a selection made with
  uniform scores (none exist yet); round r + 1 uses the scores uploaded in round r.

No public code exists; every choice above is ours and listed in the README.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from fedlrm.adapters import AdaptedLinear, adapter_parameters, block_index, get_state, set_state
from fedlrm.adapters.inject import BLOCK_INDEX
from fedlrm.algorithms.base import Algorithm, ServerState, State, Upload, weighted_mean
from fedlrm.algorithms.registry import register
from fedlrm.config import at_least_one, one_of
from fedlrm.errors import ConfigError
from fedlrm.seeding import derive_seed

MASK, SCORES = "f3ocus.mask", "f3ocus.scores"
UNITS = ("block", "layer")
#: the pymoo meta-heuristics offered (`f3ocus.optimizer`); those marked need reference directions
PYMOO = {"nsga2": ("nsga2", "NSGA2"), "nsga3": ("nsga3", "NSGA3"), "unsga3": ("unsga3", "UNSGA3"),
         "smsemoa": ("sms", "SMSEMOA"), "moead": ("moead", "MOEAD"), "rvea": ("rvea", "RVEA"),
         "ctaea": ("ctaea", "CTAEA"), "spea2": ("spea2", "SPEA2")}  # name -> (pymoo.algorithms.moo module, class)
OPTIMIZERS = tuple(PYMOO)
REFERENCE_DIRECTIONS = ("nsga3", "unsga3", "moead", "rvea", "ctaea")
Unit = Union[int, tuple[int, str]]  # a block index, or (block, module path) of an adapted layer


def block_of(key: str) -> int:
    found = block_index(key)
    if found is None:
        raise ValueError(f"F3OCUS selects within transformer blocks, but adapter {key} is in none")
    return found


def layer_of(key: str) -> tuple[int, str]:
    """(block, module path) of the adapted linear layer an adapter weight (or module) belongs to."""
    return block_of(key), key.split(".experts.")[0]


def unit_of(key: str, unit: str = "block") -> Unit:
    return block_of(key) if unit == "block" else layer_of(key)


def units(keys, unit: str = "block") -> list[Unit]:
    """The selectable units of these adapter weights, in the order masks and scores use:
    blocks by index; layers by block, then module path."""
    return sorted({unit_of(k, unit) for k in keys})


def blocks(keys) -> list[int]:
    return units(keys, "block")


def unit_label(u: Unit) -> str:
    """A block's index ("2"), or a layer's path from its block on ("2.self_attn.q_proj")."""
    if isinstance(u, int):
        return str(u)
    found = BLOCK_INDEX.search(u[1] + ".")
    return u[1][found.start(1):] if found else u[1]


def ntk_scores(model, images: torch.Tensor, classes: list[int] | None = None, unit: str = "block") -> torch.Tensor:
    """Normalised principal eigenvalue of each unit's (block's or layer's) empirical NTK on
    `images`, over the logits of `classes` (all if None), in the order of `units`."""
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
    for u in units(params, unit):
        J = torch.cat([jac[k].reshape(jac[k].shape[0] * jac[k].shape[1], -1) for k in params
                       if unit_of(k, unit) == u], dim=1)
        eig.append(torch.linalg.matrix_norm(J.double(), ord=2) ** 2)  # lambda_max(J J^T) = sigma_max(J)^2
    eig = torch.stack(eig)
    return eig / eig.sum() if eig.sum() > 0 else torch.full_like(eig, 1.0 / len(eig))


def client_budgets(budget: Union[int, Sequence[int]], n: int) -> np.ndarray:
    """Each of `n` clients' budget: one for all, or one per client."""
    return np.broadcast_to(np.asarray(budget, dtype=np.int64), (n,)).copy()


def objectives(masks: np.ndarray, scores: np.ndarray, budget: Union[int, Sequence[int]]) -> tuple[float, float]:
    """(importance, diversity) of a selection: masks (clients, units) of 0/1; `budget` one for
    every client or one per client. Diversity divides each pair's Hamming distance by
    b_c + b_d (2 budget when all are equal), the distance of two disjoint choices."""
    importance = float((masks * scores).sum() / len(masks))
    n = len(masks)
    if n < 2:
        return importance, 0.0
    b = client_budgets(budget, n)
    hamming = np.abs(masks[:, None, :] - masks[None, :, :]).sum(-1)
    pairs = np.triu_indices(n, 1)
    diversity = float((hamming[pairs] / (b[:, None] + b[None, :])[pairs]).mean())
    return importance, diversity


def make_algorithm(optimizer: str, population: int, operators: dict):
    """The pymoo algorithm `optimizer` with our operators; those that need reference directions
    get `population` of them, evenly spaced on the two-objective simplex (Das-Dennis), which
    sets their population size."""
    from importlib import import_module

    from pymoo.util.ref_dirs import get_reference_directions

    module, name = PYMOO[optimizer]
    cls = getattr(import_module(f"pymoo.algorithms.moo.{module}"), name)
    if optimizer not in REFERENCE_DIRECTIONS:
        return cls(pop_size=population, **operators)
    ref_dirs = get_reference_directions("das-dennis", 2, n_partitions=population - 1)
    if optimizer == "moead":  # it replaces neighbours one offspring at a time, without duplicate elimination
        return cls(ref_dirs, n_neighbors=min(20, population),
                   **{k: v for k, v in operators.items() if k != "eliminate_duplicates"})
    return cls(ref_dirs=ref_dirs, **operators)


def select_layers(scores: np.ndarray, budget: Union[int, Sequence[int]], optimizer: str, population: int,
                  generations: int, seed: int) -> dict:
    """Multi-objective choice of each client's `budget` units (one for all or one per client;
    pymoo); see the module docstring."""
    from pymoo.core.crossover import Crossover
    from pymoo.core.mutation import Mutation
    from pymoo.core.problem import Problem
    from pymoo.core.repair import Repair
    from pymoo.core.sampling import Sampling
    from pymoo.optimize import minimize
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    one_of("f3ocus.optimizer", optimizer, OPTIMIZERS)
    n, L = scores.shape
    budgets = np.minimum(client_budgets(budget, n), L)
    archive: dict[bytes, np.ndarray] = {}
    rng = np.random.default_rng(seed)  # every random choice of our operators, in call order

    def repair(x: np.ndarray) -> np.ndarray:
        """Exactly budgets[c] units for client c: drop the least, add the most important."""
        x = x.reshape(n, L).copy()
        for c in range(n):
            chosen = np.flatnonzero(x[c])
            if len(chosen) > budgets[c]:
                x[c, chosen[np.argsort(scores[c, chosen], kind="stable")[: len(chosen) - budgets[c]]]] = 0
            elif len(chosen) < budgets[c]:
                free = np.flatnonzero(x[c] == 0)
                x[c, free[np.argsort(-scores[c, free], kind="stable")[: budgets[c] - len(chosen)]]] = 1
        return x.reshape(-1)

    class Selection(Problem):
        def __init__(self):
            super().__init__(n_var=n * L, n_obj=2, xl=0, xu=1, vtype=bool)

        def _evaluate(self, X, out, *args, **kwargs):
            F = []
            for x in X.astype(np.int64):
                imp, div = objectives(x.reshape(n, L), scores, budgets)
                F.append([-imp, -div])
                archive.setdefault(x.tobytes(), np.array([-imp, -div]))
            out["F"] = np.array(F)

    class Sample(Sampling):
        def _do(self, problem, n_samples, **kwargs):
            X = np.zeros((n_samples, n * L), dtype=bool)
            for i in range(n_samples):
                for c in range(n):
                    X[i, c * L + rng.permutation(L)[: budgets[c]]] = True
            return X

    class Cross(Crossover):  # uniform crossover of whole client rows: each row keeps its size
        def __init__(self):
            super().__init__(2, 2)

        def _do(self, problem, X, **kwargs):
            _, n_matings, _ = X.shape
            Y = X.copy()
            for k in range(n_matings):
                swap = np.repeat(rng.random(n) < 0.5, L)
                Y[0, k, swap], Y[1, k, swap] = X[1, k, swap], X[0, k, swap]
            return Y.astype(bool)

    class Mutate(Mutation):  # per client, with prob 1/n: swap a chosen unit for an unchosen one
        def _do(self, problem, X, **kwargs):
            X = X.copy().astype(bool).reshape(len(X), n, L)
            for x in X:
                for c in range(n):
                    on, off = np.flatnonzero(x[c]), np.flatnonzero(~x[c])
                    if rng.random() < 1.0 / n and len(on) and len(off):
                        x[c, rng.choice(on)], x[c, rng.choice(off)] = False, True
            return X.reshape(len(X), -1)

    class Budget(Repair):  # after sampling and every mating, in every algorithm: the budget holds
        def _do(self, problem, X, **kwargs):
            return np.array([repair(x.astype(np.int64)) for x in X], dtype=bool).reshape(len(X), -1)

    operators = dict(sampling=Sample(), crossover=Cross(), mutation=Mutate(), repair=Budget(),
                     eliminate_duplicates=True)
    minimize(Selection(), make_algorithm(optimizer, population, operators), ("n_gen", generations),
             seed=seed % (2**31), verbose=False)
    X = np.array([np.frombuffer(k, dtype=np.int64) for k in archive])
    F = np.array(list(archive.values()))
    if not (X.reshape(len(X), n, L).sum(-1) == budgets).all():  # by construction; refuse rather than overspend
        raise RuntimeError(f"F3OCUS: {optimizer} evaluated a selection outside the budgets {budgets.tolist()}")
    front = NonDominatedSorting().do(F, only_non_dominated_front=True)
    front = front[np.unique(F[front], axis=0, return_index=True)[1]]  # one candidate per front point
    front = front[np.lexsort((F[front, 1], F[front, 0]))]
    span = F[front].max(0) - F[front].min(0)
    normalised = (F[front] - F[front].min(0)) / np.where(span > 0, span, 1)
    best = front[int(np.argmin(np.linalg.norm(normalised, axis=1)))]
    return {"masks": X[best].reshape(n, L), "front": -F[front], "chosen": -F[best], "evaluated": -F,
            "evaluated_masks": X, "budgets": budgets}


@dataclass
class F3OCUSSettings:
    budget: int = 2  # units each client trains per round (every client, and newcomers, unless set per client)
    budgets: Optional[list[int]] = None  # one budget per training client (data.training_clients), instead
    budget_distribution: str = "none"  # none | uniform: each training client's budget drawn once from the seed
    budget_min: int = 1  # the uniform distribution's bounds, both included; budget_max None: every unit
    budget_max: Optional[int] = None
    unit: str = "block"  # what is selected: block (its adapted layers together) | layer (one adapted linear)
    optimizer: str = "nsga2"  # pymoo meta-heuristic, one of OPTIMIZERS
    population: int = 40  # population size; the reference directions' count for those that need them
    generations: int = 30
    ntk_batch: int = 8  # images per client for the layer-wise NTK


@dataclass
class Selections:
    """The server's record: the selection clients train with next, and how it was chosen."""

    masks: torch.Tensor  # (clients, units) 0/1: the units each client trains in the next round
    scores: torch.Tensor  # (clients, units): each client's latest scores (uniform until it sent some)
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
        if cfg.algorithm == cls.name and "text" in cfg.model.adapt_encoders:
            raise ConfigError("f3ocus selects image-encoder blocks or layers for each client; it does not adapt "
                              "the text encoder: use model.adapt_encoders=[image] with f3ocus")
        one_of("f3ocus.optimizer", settings.optimizer, OPTIMIZERS)
        one_of("f3ocus.unit", settings.unit, UNITS)
        one_of("f3ocus.budget_distribution", settings.budget_distribution, ("none", "uniform"))
        for key in ("budget", "generations", "ntk_batch", "budget_min"):
            at_least_one(f"f3ocus.{key}", getattr(settings, key))
        if settings.population < 2:
            raise ConfigError(f"f3ocus.population must be at least 2 (parents to mate), got {settings.population}")
        if settings.budget_max is not None and settings.budget_max < settings.budget_min:
            raise ConfigError(f"f3ocus.budget_max={settings.budget_max} is below f3ocus.budget_min="
                              f"{settings.budget_min}; the budgets are drawn from budget_min..budget_max")
        if settings.budgets is not None:
            if settings.budget_distribution != "none":
                raise ConfigError(f"f3ocus.budgets gives every client's budget, and f3ocus.budget_distribution="
                                  f"{settings.budget_distribution} draws them; set one of the two")
            for i, b in enumerate(settings.budgets):
                at_least_one(f"f3ocus.budgets[{i}]", b)
            training = cfg.data.training_clients
            if cfg.algorithm == cls.name and len(settings.budgets) != training:
                held_out = f" (data.new_clients={cfg.data.new_clients} join later)" if cfg.data.new_clients else ""
                raise ConfigError(f"f3ocus.budgets has {len(settings.budgets)} budget(s), but the run has {training} "
                                  f"training client(s){held_out}; give one budget per training client")
        layers = cfg.model.target_layers
        if cfg.algorithm == cls.name and settings.unit == "block" and layers:  # the rest: check_model
            cls.check_budgets(settings, len(layers), f"block(s) of model.target_layers={list(layers)}")

    @staticmethod
    def check_budgets(settings, count: int, what: str, hint: str = "") -> None:
        """Every budget setting in use is at most the `count` units (`what`) there are to select."""
        used = [("f3ocus.budget", settings.budget)]  # a newcomer's budget, whatever the clients'
        if settings.budgets is not None:
            used += [(f"f3ocus.budgets[{i}]", b) for i, b in enumerate(settings.budgets)]
        elif settings.budget_distribution == "uniform":
            used += [("f3ocus.budget_min", settings.budget_min)]
            if settings.budget_max is not None:
                used += [("f3ocus.budget_max", settings.budget_max)]
        for key, value in used:
            if value > count:
                raise ConfigError(f"{key}={value} is more than the {count} {what}; use {key} at most {count}{hint}")

    def check_model(self, adapted_modules):
        unit = self.settings.unit
        found = units(adapted_modules, unit)
        if unit == "block":
            self.check_budgets(self.settings, len(found), f"transformer block(s) that carry adapters (blocks "
                               f"{found}, from model.target_layers={list(self.cfg.model.target_layers)})",
                               ", or adapt more blocks")
        else:
            self.check_budgets(self.settings, len(found), f"adapted layer(s) (model.target_modules="
                               f"{list(self.cfg.model.target_modules)} in {len(blocks(adapted_modules))} "
                               f"block(s))", ", or adapt more layers")

    def client_budgets(self, count: int) -> np.ndarray:
        """Each training client's budget among `count` units: f3ocus.budgets, drawn once from the run
        seed (f3ocus.budget_distribution=uniform, budget_min..budget_max), or f3ocus.budget for all."""
        f, n = self.settings, self.cfg.data.training_clients
        if f.budgets is not None:
            return np.array(f.budgets, dtype=np.int64)
        if f.budget_distribution == "uniform":
            high = count if f.budget_max is None else f.budget_max
            rng = np.random.default_rng(derive_seed(self.cfg.seed, "f3ocus", "budgets"))
            return rng.integers(f.budget_min, high, size=n, endpoint=True).astype(np.int64)
        return np.full(n, f.budget, dtype=np.int64)

    def make_layer(self, linear, layout):
        return AdaptedLinear(linear, {"global": self.expert(linear, self.cfg.adapter.rank)})

    # ----- server -----------------------------------------------------------------------
    def select(self, scores: np.ndarray, for_round: int, record: Selections | None) -> Selections:
        """The selection clients train with in `for_round`, from the scores known now."""
        f = self.settings
        picked = select_layers(scores, self.client_budgets(scores.shape[1]), f.optimizer, f.population,
                               f.generations, derive_seed(self.cfg.seed, "f3ocus", for_round))
        fronts = {**(record.fronts if record else {}), for_round: torch.from_numpy(picked["front"])}
        chosen = {**(record.chosen if record else {}), for_round: torch.from_numpy(picked["chosen"])}
        return Selections(torch.from_numpy(picked["masks"]), torch.from_numpy(scores), fronts, chosen)

    def init_server(self, weights: State) -> ServerState:
        # the clients that train: a new client (data.new_clients) must not shape their selection
        n, L = self.cfg.data.training_clients, len(units(weights, self.settings.unit))
        return ServerState(weights, self.select(np.full((n, L), 1.0 / L), 1, None))

    def message_for(self, state: ServerState, client_id: int, server_round: int) -> State:
        return {**state.weights, MASK: state.record.masks[client_id].clone()}

    def newcomer_message(self, state: ServerState, server_round: int) -> State:
        """The weights and, as a newcomer's units, the `f3ocus.budget` units of highest mean score
        over the clients (the lower unit among equals): the server has no scores of a newcomer, so it
        picks what is important to the federation. The newcomer fine-tunes those units' LoRA."""
        mean = state.record.scores.double().mean(0)
        chosen = torch.argsort(-mean, stable=True)[: self.settings.budget]
        mask = torch.zeros_like(state.record.masks[0])
        mask[chosen] = 1
        return {**state.weights, MASK: mask}

    def aggregate(self, state: ServerState, uploads, server_round: int) -> ServerState:
        # each adapter weight is averaged over the uploads that hold it: each unit over its trainers
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
        unit, params = self.settings.unit, adapter_parameters(model)
        chosen = {u for u, on in zip(units(params, unit), received[MASK].tolist()) if on}
        for key, p in params.items():
            p.requires_grad_(unit_of(key, unit) in chosen)  # frozen ones cost no backward below the lowest chosen

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
            scores = ntk_scores(model, images.to(device), train_set.classes, self.settings.unit)
        return {SCORES: scores.float().cpu()}

    def report_schema(self, model) -> dict:
        return {SCORES: ((len(units(adapter_parameters(model), self.settings.unit)),), torch.float32)}

    # ----- records ----------------------------------------------------------------------
    def write_report(self, run_dir, state: ServerState) -> None:
        record, unit = state.record, self.settings.unit
        rounds = sorted(record.chosen)
        shared = [k for k in state.weights if ".experts.global." in k]
        budgets = self.client_budgets(record.masks.shape[1])
        report = {
            "objectives": ["importance: mean over clients of the summed scores of their units",
                           "diversity: mean over client pairs of the Hamming distance of their selections "
                           "/ (sum of the pair's budgets)"],
            "optimizer": self.settings.optimizer,
            "unit": unit,
            "units": [unit_label(u) for u in units(shared, unit)],
            "blocks": blocks(shared),
            "budgets": budgets.tolist(),
            "newcomer_budget": self.settings.budget,
            "rounds": {r: {"front": record.fronts[r].tolist(), "chosen": record.chosen[r].tolist()} for r in rounds},
            "last_scores": record.scores.tolist(),
            "next_masks": record.masks.tolist(),
        }
        (run_dir / "selection.json").write_text(json.dumps(report, indent=2))
        plot_selection(run_dir / "selection.png", record.fronts[rounds[-1]].numpy(), record.chosen[rounds[-1]].numpy(),
                       record.masks.numpy(), "transformer block" if unit == "block" else "adapted layer")


def plot_selection(path, front, chosen, masks, unit_name: str = "transformer block") -> None:
    """F3OCUS: the last Pareto front with its chosen point, and who trains which unit next."""
    from fedlrm.reporting import MaxNLocator, plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(front[:, 0], front[:, 1], marker="o", linestyle="-", label="Pareto front (evaluated candidates)")
    axes[0].scatter([chosen[0]], [chosen[1]], color="tab:red", zorder=3, s=60, label="chosen")
    axes[0].set(xlabel="importance (mean summed NTK score)", ylabel="inter-client diversity", title="layer selection")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].imshow(masks, cmap="Blues", aspect="auto", vmin=0, vmax=1)
    axes[1].set(xlabel=unit_name, ylabel="client", title=f"{unit_name}s each client trains next")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
