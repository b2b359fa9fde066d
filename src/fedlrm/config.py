"""Run configuration: a typed schema, YAML files and `key=value` overrides.

The schema is the single list of valid keys; an unknown key or a value of the wrong
type is an error that names the key, not a silently ignored typo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedlrm.errors import ConfigError

ASSETS = Path(str(resources.files("fedlrm") / "assets"))
BUILTIN_MODEL = "builtin:tiny-clip"
BUILTIN_DATASET_DIR = ASSETS / "cifar10-subset"


@dataclass
class ModelConfig:
    # `hf`: transformers CLIPModel (hub id or local directory); `open_clip`: open_clip model name.
    backend: str = "hf"
    name: str = BUILTIN_MODEL
    # open_clip only: the pretrained tag or a local checkpoint file.
    pretrained: Optional[str] = None
    prompt: str = "a photo of a {}."
    # Suffixes of image-encoder linear layers that carry adapters (q and v projections).
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # Only blocks with these indices are adapted (negative: from the top, -1 the last); empty: every block.
    target_layers: list[int] = field(default_factory=list)


@dataclass
class AdapterConfig:
    rank: int = 16  # the (global) LoRA rank
    alpha: float = 32.0  # scaling of an expert is alpha / its rank
    dropout: float = 0.0
    local_rank: int = 4  # the personal expert's rank (fedlrm, apfl); the paper fixes 4
    gate: str = "sample"  # fedlrm gate granularity: `sample` (one weight pair per image) or `token`
    apfl_mix: float = 0.5  # apfl's fixed weight of the global LoRA


@dataclass
class DataConfig:
    # builtin (the shipped CIFAR-10 subset) | parquet | hub | imagefolder | torchvision
    source: str = "builtin"
    train: Optional[str] = None  # parquet file, hub dataset id, image folder, torchvision name
    test: Optional[str] = None  # parquet file or image folder of the test split
    name: Optional[str] = None  # hub config name, or torchvision dataset (cifar10, caltech101)
    root: str = "~/.cache/fedlrm/torchvision"  # torchvision download directory
    image_column: str = "image"
    label_column: str = "label"
    exclude_classes: list[str] = field(default_factory=list)
    num_clients: int = 10
    partition: str = "shard"  # shard | dirichlet | classes
    shards_per_client: int = 2
    dirichlet_alpha: float = 0.5
    classes_per_client: int = 2
    shots: int = 16  # images per class per client; 0 keeps the whole partition
    test_per_client: Optional[int] = 200  # None: as many as the test split allows
    global_test_size: Optional[int] = None  # None: the whole test split
    augment: bool = False


@dataclass
class TrainConfig:
    rounds: int = 20
    local_epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine (over the whole run) | constant
    client_fraction: float = 1.0
    prox_mu: float = 0.01  # fedprox
    eval_every: int = 1
    eval_batch_size: int = 256
    threads: Optional[int] = None  # torch intra-op threads; None leaves torch's default
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:1, mps
    precision: str = "fp32"  # fp32 | bf16 (autocast for forward passes)
    # Recompute each encoder block's activations in the backward pass instead of keeping them:
    # exact (same results) but costs about one more forward pass. true | false | null (auto: on
    # when a training step would keep more than 2 GiB of activations (of the blocks from the lowest
    # adapted one up), e.g. ViT-B/16 at batch 32 with every block adapted;
    # off for the small built-in model, where it would only slow training). benchmarks/cost.py.
    activation_checkpointing: Optional[bool] = None
    # When the lowest adapted block is above the first and no augmentation applies, compute the
    # frozen blocks below it once per training image and reuse their output in every local epoch
    # (and later rounds): exact, and skips most of the forward pass.
    cache_frozen_features: bool = True


@dataclass
class FedLEASEConfig:
    warmup_rounds: int = 5  # rounds of purely local LoRA before clustering (official code: 5)
    max_clusters: int = 4  # k is chosen by silhouette in [2, max_clusters] (official code: 4)


@dataclass
class FedPIAConfig:
    global_weight: float = 0.5  # client integration: (1 - w) * own + w * aligned global
    max_iterations: int = 10  # server barycenter: align-and-average passes at most
    tolerance: float = 1e-6  # stop when the barycenter moves less than this (Frobenius norm)


@dataclass
class F3OCUSConfig:
    budget: int = 2  # transformer blocks each client trains per round
    optimizer: str = "nsga2"  # pymoo meta-heuristic: nsga2 | smsemoa
    population: int = 40
    generations: int = 30
    ntk_batch: int = 8  # images per client for the layer-wise NTK


@dataclass
class FederationConfig:
    min_clients: int = 1  # a round aggregates only if at least this many valid uploads arrived
    round_timeout: Optional[float] = None  # seconds a client may take to answer (Flower runtime); None: wait
    max_norm_ratio: float = 10.0  # reject an update whose norm exceeds this times the round's median; 0: off


@dataclass
class PrivacyConfig:
    clip: float = 0.0  # L2 bound of what a client uploads, as a change to what it received; 0: no DP
    noise_multiplier: float = 0.0  # the client adds Gaussian noise of std noise_multiplier * clip
    delta: float = 1e-5  # the delta of the (epsilon, delta) reported in privacy.json
    secagg: bool = False  # Flower runtime: aggregate with SecAgg+ (server sees only the sum)
    secagg_shares: int = 3  # SecAgg+: shares each client's secret is split into
    secagg_threshold: int = 2  # SecAgg+: shares needed to reconstruct
    secagg_clip_range: float = 8.0  # SecAgg+: values are clipped to [-range, range] before quantisation
    secagg_quantization_range: int = 4194304  # SecAgg+: quantisation levels (2**22)
    secagg_max_weight: float = 1000.0  # SecAgg+: bound on a client's training examples (its weight)


@dataclass
class RunConfig:
    algorithm: str = "fedlrm"
    seed: int = 0
    output_dir: str = "runs"
    name: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fedlease: FedLEASEConfig = field(default_factory=FedLEASEConfig)
    fedpia: FedPIAConfig = field(default_factory=FedPIAConfig)
    f3ocus: F3OCUSConfig = field(default_factory=F3OCUSConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


CHOICES = {
    "model.backend": ("hf", "open_clip"),
    "adapter.gate": ("sample", "token"),
    "data.source": ("builtin", "parquet", "hub", "imagefolder", "torchvision"),
    "data.partition": ("shard", "dirichlet", "classes"),
    "train.optimizer": ("adamw", "sgd"),
    "train.schedule": ("cosine", "constant"),
    "train.precision": ("fp32", "bf16"),
    "f3ocus.optimizer": ("nsga2", "smsemoa"),
}
POSITIVE = ("adapter.rank", "adapter.local_rank", "data.num_clients", "train.rounds",
            "train.local_epochs", "train.batch_size", "train.eval_every", "train.eval_batch_size",
            "fedlease.warmup_rounds", "fedpia.max_iterations", "f3ocus.budget", "f3ocus.population",
            "f3ocus.generations", "f3ocus.ntk_batch", "federation.min_clients", "privacy.secagg_shares",
            "privacy.secagg_threshold", "privacy.secagg_quantization_range")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The built-in defaults, updated by a YAML file, then by `dotted.key=value` overrides."""
    cfg = OmegaConf.structured(RunConfig)
    sources: list[tuple[str, Any]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            sources.append((str(path), OmegaConf.load(path)))
        except Exception as err:  # yaml errors come in many types
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.rounds=5)")
        sources.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
    for origin, src in sources:
        try:
            cfg = OmegaConf.merge(cfg, src)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or ""
            raise ConfigError(f"{origin}: {_explain(err, key)}") from None
    run = OmegaConf.to_object(cfg)
    validate(run)
    return run


def _explain(err: OmegaConfBaseException, key: str) -> str:
    text = str(err).splitlines()[0]
    if "not in struct" in text or "Key '" in text and "not" in text:
        return (f"unknown config key {key!r}. Valid keys are listed by `fedlrm config` "
                f"(sections: algorithm, seed, output_dir, name, model.*, adapter.*, data.*, train.*, fedlease.*, fedpia.*, f3ocus.*, federation.*, privacy.*)")
    return f"bad value for {key!r}: {text}"


def validate(cfg: RunConfig) -> None:
    from fedlrm.algorithms import ALGORITHMS

    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {cfg.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    for dotted, allowed in CHOICES.items():
        value = get(cfg, dotted)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not one of {', '.join(allowed)}")
    for dotted in POSITIVE:
        if get(cfg, dotted) < 1:
            raise ConfigError(f"{dotted} must be at least 1, got {get(cfg, dotted)}")
    if not 0 < cfg.train.client_fraction <= 1:
        raise ConfigError(f"train.client_fraction must be in (0, 1], got {cfg.train.client_fraction}")
    if not 0 <= cfg.adapter.dropout < 1:
        raise ConfigError(f"adapter.dropout must be in [0, 1), got {cfg.adapter.dropout}")
    if not 0 <= cfg.adapter.apfl_mix <= 1:
        raise ConfigError(f"adapter.apfl_mix must be in [0, 1], got {cfg.adapter.apfl_mix}")
    if cfg.data.shots < 0:
        raise ConfigError(f"data.shots must be 0 (whole partition) or more, got {cfg.data.shots}")
    if not 0 <= cfg.fedpia.global_weight <= 1:
        raise ConfigError(f"fedpia.global_weight must be in [0, 1], got {cfg.fedpia.global_weight}")
    if cfg.fedlease.max_clusters < 2:
        raise ConfigError(f"fedlease.max_clusters must be at least 2, got {cfg.fedlease.max_clusters}")
    if cfg.federation.round_timeout is not None and cfg.federation.round_timeout <= 0:
        raise ConfigError(f"federation.round_timeout must be positive seconds or null, got {cfg.federation.round_timeout}")
    if cfg.federation.max_norm_ratio < 0 or 0 < cfg.federation.max_norm_ratio <= 1:
        raise ConfigError(f"federation.max_norm_ratio must be 0 (off) or above 1, got {cfg.federation.max_norm_ratio}")
    p = cfg.privacy
    if p.clip < 0 or p.noise_multiplier < 0:
        raise ConfigError(f"privacy.clip and privacy.noise_multiplier must be >= 0, got {p.clip} and {p.noise_multiplier}")
    if p.noise_multiplier > 0 and p.clip == 0:
        raise ConfigError("privacy.noise_multiplier needs privacy.clip > 0: noise is scaled to the clipping bound")
    if not 0 < p.delta < 1:
        raise ConfigError(f"privacy.delta must be in (0, 1), got {p.delta}")
    if p.secagg_threshold > p.secagg_shares:
        raise ConfigError(f"privacy.secagg_threshold ({p.secagg_threshold}) cannot exceed privacy.secagg_shares "
                          f"({p.secagg_shares})")
    if p.secagg and not ALGORITHMS[cfg.algorithm].aggregates_by_mean:
        raise ConfigError(f"privacy.secagg gives the server only the weighted mean of the uploads, but "
                          f"{cfg.algorithm} needs each upload; use it with "
                          f"{', '.join(a for a, c in ALGORITHMS.items() if c.aggregates_by_mean and c.trains)}")
    if "{}" not in cfg.model.prompt:
        raise ConfigError(f"model.prompt {cfg.model.prompt!r} needs a '{{}}' where the class name goes")


def get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def from_dict(data: dict) -> RunConfig:
    run = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), data))
    validate(run)
    return run
