"""The shared run configuration: typed sections, YAML files and `key=value` overrides.

The sections here hold what every algorithm reads (model, adapter, data, train, federation,
privacy). Each algorithm declares its own section (`fedlease.*`, `fedprox.*`, ...) next to its
code; the loader here merges files and overrides into the shared sections plus whichever
method sections it is given, so that it needs to know nothing about the methods.
`fedlrm.algorithms.load_config` calls it with every registered algorithm's section.

The schema is the single list of valid keys; an unknown key or a value of the wrong type is
an error that names the key and the valid ones, not a silently ignored typo.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedlrm.errors import ConfigError

ASSETS = Path(str(resources.files("fedlrm") / "assets"))
BUILTIN_MODEL = "builtin:tiny-clip"
BUILTIN_DATASET_DIR = ASSETS / "cifar10-subset"
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multikrum")


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
    # The encoders whose target_modules carry the method's adapters: [image] (the FedLRM paper's), or
    # [image, text]: the text encoder's too, and class text features are then computed in every step.
    adapt_encoders: list[str] = field(default_factory=lambda: ["image"])

    def check(self) -> None:
        one_of("model.backend", self.backend, ("hf", "open_clip"))
        check_prompt("model.prompt", self.prompt)
        if not self.target_modules:
            raise ConfigError("model.target_modules is empty: name the linear layers that carry adapters "
                              "(e.g. [q_proj, v_proj])")
        unknown = [e for e in self.adapt_encoders if e not in ("image", "text")]
        if unknown or not self.adapt_encoders or len(set(self.adapt_encoders)) != len(self.adapt_encoders):
            raise ConfigError(f"model.adapt_encoders={list(self.adapt_encoders)} must name image and/or text, "
                              f"each once (e.g. [image] or [image, text])")
        if len(set(self.target_layers)) != len(self.target_layers):
            raise ConfigError(f"model.target_layers={list(self.target_layers)} names a block twice")


@dataclass
class AdapterConfig:
    """The LoRA experts of every method (a method's extra experts and mixers are its own settings)."""

    rank: int = 16  # the (global) LoRA rank
    alpha: float = 32.0  # scaling of an expert is alpha / its rank
    dropout: float = 0.0

    def check(self) -> None:
        at_least_one("adapter.rank", self.rank)
        finite_positive("adapter.alpha", self.alpha)
        if not 0 <= self.dropout < 1:  # NaN fails this too
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class DomainConfig:
    """One data source of a multi-domain federation (`data.domains`). Unset keys (null) take the
    value of the `data` section; `label` names the domain in reports."""

    label: str = ""
    source: Optional[str] = None
    train: Optional[str] = None
    test: Optional[str] = None
    name: Optional[str] = None
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    exclude_classes: Optional[list[str]] = None
    class_names: Optional[list[str]] = None
    num_clients: Optional[int] = None
    partition: Optional[str] = None
    shards_per_client: Optional[int] = None
    dirichlet_alpha: Optional[float] = None
    classes_per_client: Optional[int] = None
    shots: Optional[int] = None
    test_per_client: Optional[int] = None
    global_test_size: Optional[int] = None

    def resolve(self, data: "DataConfig") -> "DataConfig":
        from dataclasses import replace

        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "label"}
        return replace(data, **{k: v for k, v in own.items() if v is not None}, domains=[], new_clients=0)


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
    # Leave out of the train split the images the backbone was pretrained on, where its folder
    # records them (the built-in model does, for the CIFAR-10 and Caltech101 Parquet files it
    # was pretrained on; files are recognised by their sha256), so no client trains on them.
    exclude_pretraining: bool = True
    num_clients: int = 10
    partition: str = "shard"  # shard | dirichlet | classes
    shards_per_client: int = 2
    dirichlet_alpha: float = 0.5
    classes_per_client: int = 2
    shots: int = 16  # images per class per client; 0 keeps the whole partition
    test_per_client: Optional[int] = 200  # None: as many as the test split allows
    # Names of the class ids 0, 1, ... as the prompts use them; empty: from the data (a ClassLabel,
    # string labels or folder names). Needed for integer labels without names (else "0", "1", ...).
    class_names: list[str] = field(default_factory=list)
    global_test_size: Optional[int] = None  # None: the whole test split
    augment: bool = False
    # Decode every image the run uses once at start-up, so a bad file stops it before anything is
    # written (images are preprocessed only when first used either way); false: a bad file stops
    # the run when it is first met, and the run resumes from its last checkpoint once it is repaired.
    verify_images: bool = True
    # What a client classifies over: all (the paper's logits over every class of the dataset) | own
    # (the classes of its partition: its logits have exactly those columns, its prompts its own)
    client_classes: str = "all"
    # Clients held out of training: the last K client ids never train nor evaluate during the rounds;
    # after the last round each adapts from the final server state as its algorithm brings a newcomer
    # in (`Algorithm.newcomer_trains`), for new_client_epochs local epochs, and is evaluated.
    new_clients: int = 0
    new_client_epochs: Optional[int] = None  # None: train.local_epochs
    # Several data sources in one federation, each with its own clients, partition and shots (a domain
    # of the federation); a client classifies over its domain's classes. Empty: the one source above.
    # A domain's keys left unset take the values of this section.
    domains: list[DomainConfig] = field(default_factory=list)

    def check(self) -> None:
        one_of("data.client_classes", self.client_classes, ("all", "own"))
        if self.new_clients < 0:
            raise ConfigError(f"data.new_clients must be 0 or more, got {self.new_clients}")
        if self.new_client_epochs is not None:
            at_least_one("data.new_client_epochs", self.new_client_epochs)
        if self.new_clients >= self.total_clients:
            raise ConfigError(f"data.new_clients={self.new_clients} leaves no client to train: the federation has "
                              f"{self.total_clients} clients; hold out fewer")
        labels = [d.label for d in self.domains]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ConfigError(f"data.domains names the domain(s) {', '.join(map(repr, twice))} more than once; "
                              f"give every domain its own label")
        for i, domain in enumerate(self.domains):
            if not str(domain.label).strip():
                raise ConfigError(f"data.domains[{i}].label is empty; name the domain (e.g. label: cifar10)")
            try:
                domain.resolve(self).check_one()
            except ConfigError as err:
                raise ConfigError(f"data.domains[{i}] ({domain.label}): {err}") from None
        if not self.domains:
            self.check_one()

    @property
    def total_clients(self) -> int:
        """Every client of the federation: data.num_clients, or the sum over data.domains."""
        if not self.domains:
            return self.num_clients
        return sum(self.num_clients if d.num_clients is None else d.num_clients for d in self.domains)

    @property
    def training_clients(self) -> int:
        """The clients that take part in the rounds (ids 0..n-1); the new clients follow them."""
        return self.total_clients - self.new_clients

    def domain_configs(self) -> list[tuple[str, "DataConfig"]]:
        """(label, the settings of that source) for every domain; one unlabelled entry without domains."""
        if not self.domains:
            return [("", self)]
        return [(d.label, d.resolve(self)) for d in self.domains]

    def check_one(self) -> None:
        """The settings of one source (the section itself, or a domain resolved against it)."""
        one_of("data.source", self.source, ("builtin", "parquet", "hub", "imagefolder", "torchvision"))
        one_of("data.partition", self.partition, ("shard", "dirichlet", "classes"))
        at_least_one("data.num_clients", self.num_clients)
        at_least_one("data.shards_per_client", self.shards_per_client)
        if self.shots < 0:
            raise ConfigError(f"data.shots must be 0 (whole partition) or more, got {self.shots}")
        finite_positive("data.dirichlet_alpha", self.dirichlet_alpha)
        if self.test_per_client is not None and self.test_per_client < 1:
            raise ConfigError(f"data.test_per_client must be at least 1 (an empty test set has no accuracy), "
                              f"or null for as many as the test split allows; got {self.test_per_client}")
        blank = [i for i, name in enumerate(self.class_names) if not str(name).strip()]
        if blank:
            raise ConfigError(f"data.class_names has empty names (positions {blank}); give every class a name")
        twice = sorted({n for n in self.class_names if self.class_names.count(n) > 1})
        if twice:
            raise ConfigError(f"data.class_names names {', '.join(map(repr, twice))} more than once; "
                              f"classes with one name get one prompt and cannot be told apart")
        if self.global_test_size is not None and self.global_test_size < 1:
            raise ConfigError(f"data.global_test_size must be at least 1 (or null), got {self.global_test_size}")


@dataclass
class TrainConfig:
    rounds: int = 20
    # The paper's 20 rounds with 5 local epochs instead of its 10, so that the built-in default
    # (its 64 px dual encoder) finishes within about 5 minutes on 2 CPU cores; paper/*.yaml set 10.
    local_epochs: int = 5
    batch_size: int = 32
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine (over the whole run) | constant
    client_fraction: float = 1.0
    eval_every: int = 1
    # Share of the clients evaluated in a round before the last (a seeded sample per round, drawn
    # apart from the training sample); every client is evaluated in the last round.
    eval_fraction: float = 1.0
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

    def check(self) -> None:
        one_of("train.optimizer", self.optimizer, ("adamw", "sgd"))
        one_of("train.schedule", self.schedule, ("cosine", "constant"))
        one_of("train.precision", self.precision, ("fp32", "bf16"))
        for key in ("rounds", "local_epochs", "batch_size", "eval_every", "eval_batch_size"):
            at_least_one(f"train.{key}", getattr(self, key))
        finite_positive("train.lr", self.lr)
        finite_nonnegative("train.momentum", self.momentum)
        finite_nonnegative("train.weight_decay", self.weight_decay)
        if not 0 < self.client_fraction <= 1:  # NaN fails this too
            raise ConfigError(f"train.client_fraction must be in (0, 1], got {self.client_fraction}")
        if not 0 < self.eval_fraction <= 1:  # NaN fails this too
            raise ConfigError(f"train.eval_fraction must be in (0, 1], got {self.eval_fraction}")
        if self.threads is not None:
            at_least_one("train.threads", self.threads)
        # The form only: whether the device exists is asked where the run happens
        # (fedlrm.federation.task.resolve_device), which may be another machine than this one.
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(self.device)):
            raise ConfigError(f"train.device={self.device!r} is not a device; use auto (cuda if available, "
                              f"else cpu), cpu, cuda, cuda:N (the N-th GPU) or mps")


@dataclass
class FederationConfig:
    min_clients: int = 1  # a round aggregates only if at least this many valid uploads arrived
    round_timeout: Optional[float] = None  # seconds a client may take to answer (Flower runtime); None: wait
    # Reject an update whose norm exceeds this times the round's (upper) median norm; null: off.
    max_norm_ratio: Optional[float] = 10.0
    # Check each client's claimed training examples against a bound: in-process the server knows
    # every client's data and the claim must not exceed it; on Flower the bound is max_examples.
    bound_examples: bool = True
    max_examples: Optional[int] = None  # the most training examples one client may claim (Flower); null: unknown
    # The largest share of a round's total weight one client gets (capped and renormalised); null: no cap.
    max_weight_share: Optional[float] = None
    # Server-side norm bound: each update (its change to what the client was sent) is scaled down to
    # at most this L2 norm before aggregation; null: no clipping.
    clip_update_norm: Optional[float] = None
    # How the uploads of a method that aggregates by a mean are combined: mean (sample-weighted, the
    # paper's FedAvg) | median | trimmed_mean (coordinate-wise) | krum | multikrum (Flower's functions).
    aggregator: str = "mean"
    trim_fraction: float = 0.1  # trimmed_mean: share of values cut at each end of every coordinate
    byzantine: int = 1  # krum, multikrum: how many attackers the selection must withstand (f)
    multikrum_keep: Optional[int] = None  # multikrum: uploads averaged (null: those left after f)
    # Flower: a file binding each client id to its SuperNode's public key (docs/security.md); a SuperNode
    # whose key is not its claimed client's gets no message. null: any SuperNode may claim any client.
    client_keys: Optional[str] = None

    def check(self) -> None:
        at_least_one("federation.min_clients", self.min_clients)
        if self.round_timeout is not None:
            finite_positive("federation.round_timeout", self.round_timeout, "seconds, or null to wait")
        if self.max_norm_ratio is not None:
            # NaN would compare False with every norm and 0 would reject all: neither may turn the check off
            _finite("federation.max_norm_ratio", self.max_norm_ratio, " above 1", "null turns the check off")
            if self.max_norm_ratio <= 1:
                raise ConfigError(f"federation.max_norm_ratio must be above 1 (an honest update may be "
                                  f"somewhat larger than the median), got {self.max_norm_ratio}; "
                                  f"null turns the check off")
        if self.max_examples is not None:
            at_least_one("federation.max_examples", self.max_examples)
        if self.max_weight_share is not None and not 0 < self.max_weight_share <= 1:  # NaN fails too
            raise ConfigError(f"federation.max_weight_share must be in (0, 1], got {self.max_weight_share}; "
                              f"null sets no cap")
        if self.clip_update_norm is not None:
            finite_positive("federation.clip_update_norm", self.clip_update_norm, "null turns clipping off")
        one_of("federation.aggregator", self.aggregator, AGGREGATORS)
        if not 0 <= self.trim_fraction < 0.5:  # NaN fails too
            raise ConfigError(f"federation.trim_fraction must be in [0, 0.5) (the share cut at each end), "
                              f"got {self.trim_fraction}")
        if self.byzantine < 0:
            raise ConfigError(f"federation.byzantine must be 0 or more, got {self.byzantine}")
        if self.multikrum_keep is not None:
            at_least_one("federation.multikrum_keep", self.multikrum_keep)
        # the file itself is read where the ServerApp runs (clients check this config too, without it)
        if self.client_keys is not None and not self.client_keys.strip():
            raise ConfigError("federation.client_keys is empty; give the path of the file that binds each client "
                              "id to its SuperNode's public key (docs/security.md), or null to leave SuperNodes "
                              "unchecked")


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

    def check(self) -> None:
        for key in ("secagg_shares", "secagg_threshold", "secagg_quantization_range"):
            at_least_one(f"privacy.{key}", getattr(self, key))
        # NaN would turn clipping (and so DP) off without a word; infinity clips nothing
        finite_nonnegative("privacy.clip", self.clip, "0 turns differential privacy off")
        finite_nonnegative("privacy.noise_multiplier", self.noise_multiplier)
        finite_positive("privacy.secagg_clip_range", self.secagg_clip_range)
        finite_positive("privacy.secagg_max_weight", self.secagg_max_weight)
        if self.noise_multiplier > 0 and self.clip == 0:
            raise ConfigError("privacy.noise_multiplier needs privacy.clip > 0: noise is scaled to the clipping bound")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta}")
        if self.secagg_threshold > self.secagg_shares:
            raise ConfigError(f"privacy.secagg_threshold ({self.secagg_threshold}) cannot exceed "
                              f"privacy.secagg_shares ({self.secagg_shares})")


@dataclass
class ReportConfig:
    """What a run shows while it goes (a log line per round is always written) and leaves behind."""

    tensorboard: bool = False  # TensorBoard event files of the per-round and per-client metrics in RUN_DIR/tensorboard
    # Whose personalized models a finished run writes to RUN_DIR/adapters: all | trained (the clients that
    # trained at least once) | none | client ids, e.g. "0,3,17". With thousands of clients, all is slow and large.
    export_adapters: str = "all"

    def export_selection(self) -> str | list[int]:
        """"all", "trained", "none", or the client ids the setting lists."""
        text = str(self.export_adapters).strip()
        if text in ("all", "trained", "none"):
            return text
        parts = [p.strip() for p in text.split(",")]
        if not text or not all(p.isdigit() for p in parts):
            raise ConfigError(f"report.export_adapters={self.export_adapters!r} is not all, trained, none or a list "
                              f"of client ids such as 0,3,17")
        return sorted({int(p) for p in parts})

    def check(self) -> None:
        import importlib.util

        self.export_selection()

        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("report.tensorboard=true needs the tensorboard package: pip install "
                              "'fedlrm[tensorboard]' (or drop report.tensorboard)")


@dataclass
class SharedConfig:
    """The keys every run has, whatever algorithm it runs."""

    algorithm: str = "fedlrm"
    seed: int = 0
    output_dir: str = "runs"
    name: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


#: every key at the top of a run config that is not a method's section
SHARED_KEYS = tuple(f.name for f in fields(SharedConfig))
SHARED_SECTIONS = tuple(k for k in SHARED_KEYS if k not in ("algorithm", "seed", "output_dir", "name"))


@dataclass
class RunConfig(SharedConfig):
    """A resolved run configuration: the shared keys and every known method's own settings."""

    #: method name -> its settings (a dataclass instance); the run's own is `method`
    methods: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> Any:
        """The settings of the algorithm this run runs (its `<algorithm>.*` section)."""
        try:
            return self.methods[self.algorithm]
        except KeyError:
            raise ConfigError(f"no settings for algorithm {self.algorithm!r}; load the config with "
                              f"fedlrm.algorithms.load_config") from None

    def check_shared(self) -> None:
        if self.name is not None:
            folder_name("name", self.name)
        if not str(self.output_dir).strip():
            raise ConfigError("output_dir is empty; give the folder run directories go in (e.g. runs)")
        for name in SHARED_SECTIONS:
            getattr(self, name).check()


def load(path: str | Path | None, overrides: list[str] | None, sections: Mapping[str, type],
         moved: Mapping[str, list[str]] | None = None) -> RunConfig:
    """The defaults, updated by a YAML file, then by `dotted.key=value` overrides.

    `sections` maps method names to their settings dataclasses (each becomes a section of
    that name); `moved` maps keys that used to exist to where they live now, for the error
    a user gets when typing an old one."""
    schema = _schema(sections)
    sources: list[tuple[str, Any]] = []
    if path is not None:
        path = find_config(path)
        try:
            node = OmegaConf.load(path)
        except Exception as err:  # yaml errors come in many types
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        sources.append((str(path), _relative_to(node, path.parent)))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.rounds=5)")
        sources.append((f"override {item!r}", _parse_override(item)))
    cfg = OmegaConf.structured(schema)
    for origin, src in sources:
        try:
            cfg = OmegaConf.merge(cfg, src)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or ""
            raise ConfigError(f"{origin}: {_explain(err, key, sections, moved or {})}") from None
    try:
        resolved = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # e.g. ${oc.env:FEDLRM_DATASETS} with the variable unset
        key = getattr(err, "full_key", None) or ""
        text = str(err).splitlines()[0]
        missing = re.search(r"Environment variable '([^']+)' not found", text)
        if missing:
            text = f"the environment variable {missing[1]} it is built from is not set"
        raise ConfigError(f"{key}: {text}; set it (e.g. {missing[1] if missing else 'VAR'}=/path/to/folder "
                          f"fedlrm ...) or give {key}=... as an override") from None
    return _resolved(resolved, sections)


def _parse_override(item: str) -> Any:
    """One `key=value` override; a value YAML cannot read (`name=[`, `train.lr={`) is a ConfigError."""
    try:
        return OmegaConf.from_dotlist([item])
    except Exception as err:  # noqa: BLE001 - yaml and omegaconf raise many types for a bad value
        key, _, value = item.partition("=")
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"override {item!r}: the value {value!r} of {key} cannot be read ({first}); values "
                          f"are read as YAML, so a list is written [a,b] and a text that starts with '[' or '{{' "
                          f"must be quoted: {key}='\"{value}\"' in the shell") from None


#: the configurations that ship with fedlrm, found by name (`--config paper/cifar10`)
PACKAGED_CONFIGS = Path(str(resources.files("fedlrm") / "configs"))


def packaged_configs() -> dict[str, Path]:
    """Name (e.g. `paper/cifar10`) -> file of every configuration shipped with the package."""
    return {p.relative_to(PACKAGED_CONFIGS).with_suffix("").as_posix(): p
            for p in sorted(PACKAGED_CONFIGS.rglob("*.yaml"))}


def find_config(path_or_name: str | Path) -> Path:
    """A config file: an existing path, else a shipped configuration of that name."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    shipped = packaged_configs()
    name = str(path_or_name).removesuffix(".yaml").removesuffix(".yml")
    if name in shipped:
        return shipped[name]
    raise ConfigError(f"config file {path_or_name} does not exist, and no configuration shipped with fedlrm "
                      f"has that name (those are: {', '.join(shipped) or 'none'}; `fedlrm configs` lists them)")


#: keys whose values are local paths when they are relative paths in a config file
_PATH_KEYS = ("output_dir", "data.root", "data.train", "data.test", "model.name", "model.pretrained",
              "federation.client_keys")


def _relative_to(node: Any, folder: Path) -> Any:
    """The file's relative paths, resolved against the file's folder (as a reader of the
    file expects), so a config means the same whatever the working directory."""
    raw = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else {}

    def raw_value(dotted: str, default: Any = None) -> Any:
        section, _, key = dotted.rpartition(".")
        owner = raw.get(section, {}) if section else raw
        return owner.get(key, default) if isinstance(owner, dict) else default

    def written_relative(value: Any) -> bool:  # as written: an interpolation is the user's (e.g. a cwd-relative variable)
        return isinstance(value, str) and "${" not in value and not value.startswith("~") and not Path(value).is_absolute()

    for dotted in _PATH_KEYS:
        value = raw_value(dotted)
        if written_relative(value) and _names_local_path(dotted, value, raw_value("data.source", "builtin"), folder):
            OmegaConf.update(node, dotted, str((folder / value).resolve()), merge=False)
    domains = raw_value("data.domains") or []
    for i, domain in enumerate(domains if isinstance(domains, list) else []):
        if not isinstance(domain, dict):
            continue
        for key in ("train", "test"):
            value = domain.get(key)
            source = domain.get("source") or raw_value("data.source", "builtin")
            if written_relative(value) and _names_local_path(f"data.{key}", value, source, folder):
                node.data.domains[i][key] = str((folder / value).resolve())
    return node


def _names_local_path(dotted: str, value: Any, source: str, base: Path) -> bool:
    """Whether `value` of the key `dotted` is a local path (relative ones read against `base`),
    not a hub id, a split name, an open_clip tag or the built-in model."""
    if not isinstance(value, str) or not value or value.startswith("builtin:"):
        return False
    if dotted in ("data.train", "data.test") and source not in ("parquet", "imagefolder"):
        return False
    if dotted.startswith("model."):
        return value.startswith((".", "~", "/")) or (base / Path(value).expanduser()).exists()
    return True


def absolute_paths(cfg: "RunConfig") -> "RunConfig":
    """A copy whose local paths are absolute (resolved against the working directory), for a
    config written where another folder or process reads it (a run directory, a Flower run)."""
    import copy

    out = copy.deepcopy(cfg)
    for dotted in _PATH_KEYS:
        section, _, key = dotted.rpartition(".")
        owner = get(out, section) if section else out
        value = getattr(owner, key)
        if dotted == "data.root" and str(value).startswith("~"):
            continue  # a cache folder in the home of whoever runs it
        if _names_local_path(dotted, value, out.data.source, Path.cwd()):
            setattr(owner, key, str(Path(value).expanduser().resolve()))
    for domain in out.data.domains:
        for key in ("train", "test"):
            value = getattr(domain, key)
            if _names_local_path(f"data.{key}", value, domain.source or out.data.source, Path.cwd()):
                setattr(domain, key, str(Path(value).expanduser().resolve()))
    return out


def from_mapping(data: Mapping, sections: Mapping[str, type]) -> RunConfig:
    """A configuration from a dict as `to_dict` writes it (keys it lacks take their defaults)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(_schema(sections)), data)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        raise ConfigError(f"stored configuration: {_explain(err, key, sections, {})}") from None
    return _resolved(OmegaConf.to_object(merged), sections)


def _schema(sections: Mapping[str, type]) -> type:
    clash = [name for name in sections if name in SHARED_KEYS]
    if clash:
        raise ConfigError(f"method section(s) {', '.join(clash)} would hide shared keys of the same name")
    return make_dataclass("RunSchema", [(name, cls, field(default_factory=cls)) for name, cls in sections.items()],
                          bases=(SharedConfig,))


def _resolved(loaded: Any, sections: Mapping[str, type]) -> RunConfig:
    shared = {k: getattr(loaded, k) for k in SHARED_KEYS}
    return RunConfig(**shared, methods={name: getattr(loaded, name) for name in sections})


def _explain(err: OmegaConfBaseException, key: str, sections: Mapping[str, type], moved: Mapping[str, list[str]]) -> str:
    text = str(err).splitlines()[0]
    if "not in struct" in text or "Key '" in text and "not" in text:
        if key in moved:
            return (f"{key!r} is no longer a key: it moved to the section of the method it belongs to, "
                    f"{' and '.join(repr(k) for k in moved[key])}")
        section, _, _ = key.partition(".")
        owner = typing.get_type_hints(SharedConfig).get(section) or sections.get(section)
        if "." in key and isinstance(owner, type):
            valid = ", ".join(f.name for f in fields(owner)) or "(none: this method has no settings)"
            return f"unknown config key {key!r}; the keys of {section} are: {valid}"
        top = [k for k in SHARED_KEYS if k not in SHARED_SECTIONS]
        return (f"unknown config key {key!r}; valid keys are {', '.join(top)}, the sections "
                f"{', '.join(s + '.*' for s in SHARED_SECTIONS)} and each algorithm's own: "
                f"{', '.join(s + '.*' for s in sections)} (`fedlrm config algorithm=NAME` lists them)")
    return f"bad value for {key!r}: {text}"


def to_dict(cfg: RunConfig) -> dict:
    """The shared keys and the running algorithm's own section (as `fedlrm config` shows it)."""
    shared = {k: getattr(cfg, k) for k in SHARED_KEYS}
    out = OmegaConf.to_container(OmegaConf.structured(SharedConfig(**shared)))
    own = asdict(cfg.method)
    if own:
        out[cfg.algorithm] = own
    return out


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# The checks of the shared sections and of each method's own, so that their messages read alike.
def one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def at_least_one(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key} must be at least 1, got {value}")


def _finite(key: str, value: float, what: str, hint: str) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number{what}, got {value}" + (f" ({hint})" if hint else ""))


def finite_positive(key: str, value: float, hint: str = "") -> None:
    """Refuse NaN, infinities and values <= 0 (NaN passes every `<` check unnoticed)."""
    _finite(key, value, " above 0", hint)
    if value <= 0:
        raise ConfigError(f"{key} must be above 0, got {value}" + (f" ({hint})" if hint else ""))


def finite_nonnegative(key: str, value: float, hint: str = "") -> None:
    """Refuse NaN, infinities and negative values."""
    _finite(key, value, " of 0 or more", hint)
    if value < 0:
        raise ConfigError(f"{key} must be 0 or more, got {value}" + (f" ({hint})" if hint else ""))


def folder_name(key: str, value: str) -> None:
    """A single folder name (a run directory under output_dir), not a path that leads elsewhere."""
    text = str(value)
    if (not text.strip() or text in (".", "..") or "/" in text or "\\" in text or "\0" in text
            or Path(text).is_absolute()):
        raise ConfigError(f"{key}={text!r} must be one folder name (the run directory under output_dir): "
                          f"no '/' or '\\', not '.' or '..', not empty; e.g. {key}=my-run")


def check_prompt(key: str, prompt: str) -> None:
    """A template with exactly one `{}` (or `{0}`) where the class name goes."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None]
        if fields.count("") > 1 or any(f not in ("", "0") for f in fields):
            raise ValueError(f"{len(fields)} placeholders where one goes")
        prompt.format("x")
    except (ValueError, IndexError, KeyError) as err:
        raise ConfigError(f"{key}={prompt!r} is not a prompt template ({err}): write one '{{}}' where the class "
                          f"name goes (e.g. 'a photo of a {{}}.'), and '{{{{' or '}}}}' for a literal brace") from None
    if not fields:
        raise ConfigError(f"{key} {prompt!r} needs a '{{}}' where the class name goes")
