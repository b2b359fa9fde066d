"""Each client's personalized model on disk, loadable without the run that made them.

Every folder has `fedlrm.json`: class names, prompt, algorithm, client, round, the base
model and the model-shaping config. The adapters are in one of two formats:

- one LoRA per adapted layer (fedavg, fedprox, local, fedpia, f3ocus on the `hf` backend): a
  real peft LoRA adapter, `adapter_config.json` (a LoraConfig) and `adapter_model.safetensors`
  with peft's key names, so `PeftModel.from_pretrained(CLIPModel.from_pretrained(base), folder)`
  loads it (`VisionTextDualEncoderModel` for a dual-encoder base, whose image tower has the same
  module names) and `export_merged` folds it into a plain folder of that class;
- mixtures (fedlrm, apfl, fedlease) and open_clip backbones: `fedlrm_adapter.safetensors` with
  fedlrm's own key names and, where the server's message carries more than weights (FedLEASE's
  cluster index), `received.safetensors`. Their gate or router weighs the experts per input,
  so no single weight matrix stands for them: they cannot be merged.

The base model is recorded as `builtin:...`, a hub id, or a path relative to the folder (the
absolute path only as a fallback hint), so a run directory moved together with the model
directory beside it still loads. `load_personalized(folder)` rebuilds the model either way.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from fedlrm.adapters import AdaptedLinear, LoRAExpert, adapted_layers, adapter_parameters, get_state, set_state
from fedlrm.algorithms import ClientRound, config_from_dict, get_algorithm
from fedlrm.config import to_dict
from fedlrm.errors import ModelError
from fedlrm.federation.task import adapt, build_model
from fedlrm.models import ClipClassifier, load_backbone

META_FILE = "fedlrm.json"
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
MIXTURE_WEIGHTS_FILE, RECEIVED_FILE = "fedlrm_adapter.safetensors", "received.safetensors"
FORMAT, LEGACY_FORMAT = "fedlrm-adapter/2", "fedlrm-adapter/1"
PEFT_KIND, MIXTURE_KIND, MERGED_KIND = "peft-lora", "fedlrm-format", "merged"
HOW_TO_LOAD = "import fedlrm; model = fedlrm.load_personalized(this_folder)"
# ClipClassifier's name of the HF image tower -> CLIPModel's; peft prefixes the wrapped model's names.
OWN_TOWER, HF_TOWER, PEFT_PREFIX = "backbone.image_encoder.", "vision_model.", "base_model.model."
_ALL_FILES = (META_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, MIXTURE_WEIGHTS_FILE, RECEIVED_FILE)


# ----- saving ------------------------------------------------------------------------------
def save_personalized(folder: Path, model, cfg, class_names: list[str], client_id: int, layout, received,
                      server_round: int) -> str:
    """Save `model` as client `client_id` evaluates it after `server_round` (`received`: the
    server's message to it). Returns the format written: `peft-lora` or `fedlrm-format`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in _ALL_FILES:  # a folder written before (a resumed run) must not keep files of the other format
        (folder / name).unlink(missing_ok=True)
    layers = [(n, layer) for n, layer in adapted_layers(model) if layer.experts]
    # peft's format holds image-tower LoRA; a text side that trains (text LoRA, a prompt context) is
    # saved in fedlrm's own format, which rebuilds the model through its algorithm
    single = (cfg.model.backend == "hf" and bool(layers) and not getattr(model, "text_trains", False)
              and all(len(layer.experts) == 1 and layer.mixer is None for _, layer in layers))
    base = base_model_record(cfg.model, folder)
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("data", "train", "output_dir", "name")}
    # the absolute path lives only in the base-model record, as a hint beside the relative one
    settings["model"] = {**settings["model"], "name": _portable_value(base["name"]),
                         "pretrained": _portable_value(base.get("pretrained"))}
    meta = {
        "format": FORMAT, "kind": PEFT_KIND if single else MIXTURE_KIND, "how_to_load": HOW_TO_LOAD,
        "algorithm": cfg.algorithm, "client": client_id, "round": server_round,
        "class_names": list(class_names), "prompt": cfg.model.prompt, "base_model": base,
        "layout": layout, "config": settings,
    }
    if single:
        modules = {}
        weights = {}
        for name, layer in layers:
            (expert_name, expert), = layer.experts.items()
            target = peft_module_name(name)
            modules[target] = f"{name}.experts.{expert_name}"
            weights[f"{PEFT_PREFIX}{target}.lora_A.weight"] = expert.A.detach().contiguous().cpu()
            weights[f"{PEFT_PREFIX}{target}.lora_B.weight"] = expert.B.detach().contiguous().cpu()
        meta["lora_modules"] = modules
        save_file(weights, folder / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
        lora = lora_config({peft_module_name(n): next(iter(layer.experts.values())) for n, layer in layers},
                           _portable_value(base["name"]), (model.backbone.hf_class, model.backbone.hf_module))
        (folder / PEFT_CONFIG_FILE).write_text(json.dumps(lora, indent=2))
    else:
        save_file({k: v.contiguous().cpu() for k, v in get_state(model).items()}, folder / MIXTURE_WEIGHTS_FILE)
        params = adapter_parameters(model)
        extra = {k: v.contiguous().cpu() for k, v in received.items() if k not in params}
        if extra:
            save_file(extra, folder / RECEIVED_FILE)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta["kind"]


def peft_module_name(name: str) -> str:
    """The CLIPModel module name of an adapted layer of the HF backbone's image tower."""
    if not name.startswith(OWN_TOWER):
        raise ModelError(f"adapted layer {name!r} is not in the image encoder; it cannot be written as peft LoRA")
    return HF_TOWER + name[len(OWN_TOWER):]


def lora_config(experts: dict[str, LoRAExpert], base_model_name_or_path: str | None,
                base_class: tuple[str, str] = ("CLIPModel", "transformers.models.clip.modeling_clip")) -> dict:
    """A peft LoraConfig (as `LoraConfig.save_pretrained` writes it) for these modules' experts;
    ranks or alphas that differ from the most common one go in rank_pattern / alpha_pattern."""
    r = Counter(e.rank for e in experts.values()).most_common(1)[0][0]
    alpha = Counter(e.alpha for e in experts.values()).most_common(1)[0][0]
    drops = {e.dropout.p if isinstance(e.dropout, nn.Dropout) else 0.0 for e in experts.values()}

    def pattern(name: str) -> str:
        # peft matches patterns against module names as `(.*\.)?pattern$`; a name below the
        # tower is unique among the targets (only image-tower layers carry LoRA)
        return re.escape(name[len(HF_TOWER):])

    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True,
        "auto_mapping": {"base_model_class": base_class[0], "parent_library": base_class[1]},
        "r": r, "lora_alpha": alpha, "lora_dropout": max(drops),
        # full module names: only the adapted layers of the vision tower, in the adapted blocks
        "target_modules": sorted(experts),
        "rank_pattern": {pattern(n): e.rank for n, e in experts.items() if e.rank != r},
        "alpha_pattern": {pattern(n): e.alpha for n, e in experts.items() if e.alpha != alpha},
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }


def base_model_record(model_cfg, folder: Path) -> dict:
    """The base model as a folder elsewhere can find it: {'backend', 'name', 'pretrained'}, where
    `name` (and `pretrained`) is {'id': ...} for builtin:... and hub ids or open_clip tags, or
    {'path': relative to `folder`, 'absolute_path_hint': ...} for a local directory or file."""
    return {"backend": model_cfg.backend, "name": _reference(model_cfg.name, folder),
            "pretrained": _reference(model_cfg.pretrained, folder)}


def _looks_local(value: str) -> bool:
    # as the backbone loader decides between a local directory and a hub id
    return value.startswith((".", "/", "~")) or Path(value).expanduser().exists()


def _reference(value: str | None, folder: Path) -> dict | None:
    if value is None:
        return None
    if value.startswith("builtin:") or not _looks_local(value):
        return {"id": value}
    target = Path(value).expanduser().resolve()
    try:
        relative = Path(os.path.relpath(target, Path(folder).resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        relative = str(target)
    return {"path": relative, "absolute_path_hint": str(target)}


def _portable_value(ref: dict | None) -> str | None:
    return None if ref is None else ref.get("id", ref.get("path"))


def _resolve(ref: dict | None, folder: Path, what: str) -> str | None:
    if ref is None:
        return None
    if "id" in ref:
        return ref["id"]
    candidate = (folder / ref["path"]).resolve()
    if candidate.exists():
        return str(candidate)
    hint = ref.get("absolute_path_hint")
    if hint and Path(hint).exists():
        return hint
    raise ModelError(
        f"the base model ({what}) of {folder} is not at {candidate} (recorded relative to the folder as "
        f"{ref['path']!r}) nor at {hint}; put the model directory there, or give its place with "
        f"base_model=... (fedlrm predict/evaluate/export: --base-model DIR)")


# ----- loading -----------------------------------------------------------------------------
def read_meta(folder: str | Path) -> dict:
    """The metadata of a personalized-model folder (no model is loaded); refuses a folder that
    is neither a fedlrm export nor a legacy one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a directory; give a client's adapter folder (RUN_DIR/adapters/client_XX)")
    if (folder / META_FILE).is_file():
        meta = _json(folder / META_FILE)
        if meta.get("format") != FORMAT or meta.get("kind") not in (PEFT_KIND, MIXTURE_KIND, MERGED_KIND):
            raise ModelError(f"{folder / META_FILE} is not a fedlrm model description (format {meta.get('format')!r}, "
                             f"kind {meta.get('kind')!r}; this fedlrm reads {FORMAT})")
        return meta
    if (folder / PEFT_CONFIG_FILE).is_file():
        meta = _json(folder / PEFT_CONFIG_FILE)
        if meta.get("format") == LEGACY_FORMAT:  # written by fedlrm 0.1 before the peft format
            return {**meta, "kind": "legacy", "algorithm": meta["config"]["algorithm"],
                    "prompt": meta["config"]["model"]["prompt"]}
        if "peft_type" in meta:
            raise ModelError(f"{folder} is a peft adapter without {META_FILE}: fedlrm needs the class names and "
                             "prompt it records. Load the adapter with peft, or use a folder fedlrm wrote")
    raise ModelError(f"{folder} is not a personalized fedlrm model: it has no {META_FILE} (a folder fedlrm run "
                     f"writes under RUN_DIR/adapters/client_XX, or one `fedlrm export --merged` wrote)")


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return data


def read_personalized(folder: str | Path, base_model: str | None = None) -> tuple[ClipClassifier, dict]:
    """The classifier with the saved adapters, in eval mode, and the folder's metadata.
    `base_model` replaces the recorded base model (a directory or hub id)."""
    folder = Path(folder).resolve()
    meta = read_meta(folder)
    cfg = config_from_dict(meta["config"])
    kind = meta["kind"]
    if kind == MERGED_KIND:
        name, pretrained = str(folder), None
    elif kind == "legacy":
        name, pretrained = cfg.model.name, cfg.model.pretrained
    else:
        name = base_model or _resolve(meta["base_model"]["name"], folder, "model.name")
        pretrained = _resolve(meta["base_model"].get("pretrained"), folder, "model.pretrained")
    cfg = replace(cfg, model=replace(cfg.model, name=base_model or name, pretrained=pretrained))
    backbone = load_backbone(cfg.model)
    if kind in (PEFT_KIND, MERGED_KIND):
        model = ClipClassifier(backbone, meta["class_names"], meta["prompt"])
        if kind == PEFT_KIND:
            _install_lora(model, folder, meta)
        meta["base_model_resolved"] = cfg.model.name
        return model.eval(), meta
    algorithm = get_algorithm(cfg)
    bundle = build_model(backbone, meta["class_names"], cfg, algorithm)
    if meta["layout"] != bundle.layout:
        adapt(bundle, algorithm, cfg, meta["layout"])
    weights = folder / (MIXTURE_WEIGHTS_FILE if kind == MIXTURE_KIND else PEFT_WEIGHTS_FILE)
    if (folder / RECEIVED_FILE).is_file():
        # first what the message sets beyond weights (FedLEASE's cluster), then the saved weights,
        # which are the client's final ones whatever receiving did to them
        algorithm.receive(bundle.model, ClientRound(meta["client"], meta["round"], load_file(folder / RECEIVED_FILE)))
    set_state(bundle.model, load_file(weights))
    meta["base_model_resolved"] = cfg.model.name
    return bundle.model.eval(), meta


def _install_lora(model: ClipClassifier, folder: Path, meta: dict) -> None:
    """One LoRA expert on every module the peft adapter names, with its weights."""
    lora = _json(folder / PEFT_CONFIG_FILE)
    weights = load_file(folder / PEFT_WEIGHTS_FILE)
    dropout = float(lora.get("lora_dropout") or 0.0)
    for target, key in meta["lora_modules"].items():
        layer_name, _, expert_name = key.rpartition(".experts.")
        rank = weights[f"{PEFT_PREFIX}{target}.lora_A.weight"].shape[0]
        pattern = target[len(HF_TOWER):]
        alpha = next((a for p, a in lora.get("alpha_pattern", {}).items() if re.fullmatch(p, pattern)),
                     lora["lora_alpha"])
        parent_name, _, child = layer_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        expert = LoRAExpert(linear.in_features, linear.out_features, rank, alpha, dropout)
        setattr(parent, child, AdaptedLinear(linear, {expert_name: expert}))
    set_state(model, {meta["lora_modules"][t] + f".{m}": weights[f"{PEFT_PREFIX}{t}.lora_{m}.weight"]
                      for t in meta["lora_modules"] for m in ("A", "B")})
    model.to(model.text_features.device)


def load_personalized(folder: str | Path, base_model: str | None = None):
    """The classifier (a ClipClassifier) with the saved adapters, ready for inference (eval mode).
    `fedlrm.load_personalized` wraps it with `predict`."""
    return read_personalized(folder, base_model)[0]


# ----- merged weights ----------------------------------------------------------------------
def export_merged(folder: str | Path, out: str | Path, base_model: str | None = None) -> Path:
    """A plain CLIPModel folder (save_pretrained, with tokenizer and image processor) whose
    weights have the client's LoRA merged in by peft's `merge_and_unload`, plus `fedlrm.json`
    so fedlrm loads it too. Only single-LoRA folders can be merged."""
    folder, out = Path(folder).resolve(), Path(out)
    meta = read_meta(folder)
    if meta["kind"] != PEFT_KIND:
        raise ModelError(
            f"{folder} holds a mixture of LoRA experts ({meta['algorithm']}), which cannot be merged into the "
            "weights: its gate (or router) weighs the experts differently for every input, so no single "
            "weight matrix computes the same function. Use it with fedlrm.load_personalized instead")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out} exists and is not an empty directory; give a new folder for the merged model")
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ModelError(f"merging needs peft: pip install 'fedlrm[peft]' ({err})") from None
    from transformers import AutoImageProcessor, AutoTokenizer

    from fedlrm.models.backbone import hf_model_class, quiet_transformers, resolve_name

    if meta["base_model"]["backend"] != "hf":
        raise ModelError(f"{folder}: only transformers CLIP models can be merged")
    name = resolve_name(base_model or _resolve(meta["base_model"]["name"], folder, "model.name"))
    with quiet_transformers():  # progress bars and backend notices are noise here
        try:
            with warnings.catch_warnings():  # peft calls transformers' deprecated names; not the user's to fix
                warnings.simplefilter("ignore", FutureWarning)
                base_model = hf_model_class(name).from_pretrained(name)  # CLIPModel, or a dual encoder
                merged = PeftModel.from_pretrained(base_model, str(folder)).merge_and_unload()
            tokenizer, processor = AutoTokenizer.from_pretrained(name), AutoImageProcessor.from_pretrained(name)
        except OSError as err:
            raise ModelError(f"could not load the base model {name!r}: {str(err).splitlines()[0]}") from None
        out.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
        processor.save_pretrained(out)
    info = {k: meta[k] for k in ("algorithm", "client", "round", "class_names", "prompt", "config")}
    info["config"] = {**info["config"], "model": {**info["config"]["model"], "name": ".", "pretrained": None}}
    info.update(format=FORMAT, kind=MERGED_KIND, how_to_load=HOW_TO_LOAD,
                base_model={"backend": "hf", "name": {"path": "."}, "pretrained": None},
                merged_from=_reference(str(folder), out))
    (out / META_FILE).write_text(json.dumps(info, indent=2))
    return out
