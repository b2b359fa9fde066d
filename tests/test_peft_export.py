"""Single-LoRA exports are peft LoRA adapters (and merge into plain CLIP weights); mixtures keep
fedlrm's own files; a run directory moved with its model directory still loads."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import COLOURS
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPModel

from fedlrm.adapters import LoRAExpert, adapted_layers, adapter_parameters
from fedlrm.algorithms import ALGORITHMS, get_algorithm, load_config
from fedlrm.config import ModelConfig
from fedlrm.errors import ModelError
from fedlrm.experiment import run_experiment
from fedlrm.federation.export import (base_model_record, export_merged, load_personalized, read_meta,
                                      read_personalized, save_personalized)
from fedlrm.federation.task import build_model, personalize
from fedlrm.models import load_backbone

SINGLE_LORA = ["fedavg", "fedprox", "local", "fedpia", "f3ocus"]
CLASS_NAMES = ["red", "green", "blue", "yellow", "white", "black"]


def tiny_run(tmp_path, clip_dir, dataset, algorithm, *extra):
    quick = [f"{algorithm}.{k}={v}" for k, v in ALGORITHMS[algorithm].quick_settings.items()]
    cfg = load_config(None, [
        f"model.name={clip_dir}", "data.source=parquet", f"data.train={dataset['train']}",
        f"data.test={dataset['test']}", "data.num_clients=2", "data.shards_per_client=3", "data.shots=2",
        "data.test_per_client=4", "train.rounds=1", "train.batch_size=8", "train.lr=0.05", "adapter.rank=4",
        "adapter.alpha=6", f"algorithm={algorithm}", f"output_dir={tmp_path / 'runs'}", "seed=1", *quick, *extra])
    return cfg, run_experiment(cfg, progress=False)


def pixels(model):
    return model.preprocess([Image.new("RGB", (20, 20), c) for c in COLOURS[:4]])


def _tensor(out):
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns the model output


@torch.no_grad()
def clip_logits(clip: torch.nn.Module, clip_dir, x, prompt="a photo of a {}."):
    """CLIP's zero-shot logits computed by transformers (and peft) alone, as fedlrm defines them."""
    tokens = AutoTokenizer.from_pretrained(clip_dir)([prompt.format(c) for c in CLASS_NAMES], padding=True,
                                                     return_tensors="pt")
    image = F.normalize(_tensor(clip.get_image_features(pixel_values=x)), dim=-1)
    text = F.normalize(_tensor(clip.get_text_features(input_ids=tokens["input_ids"],
                                                      attention_mask=tokens["attention_mask"])), dim=-1)
    scale = (clip.base_model.model if isinstance(clip, PeftModel) else clip).logit_scale.exp()
    return scale * image @ text.t()


@pytest.mark.parametrize("algorithm", SINGLE_LORA)
def test_single_lora_client_folder_is_a_peft_adapter_and_merges(algorithm, tmp_path, tiny_clip_dir, tiny_dataset):
    # f3ocus picks blocks itself; the others adapt only the top block (model.target_layers)
    cfg, result = tiny_run(tmp_path, tiny_clip_dir, tiny_dataset, algorithm,
                           *([] if algorithm == "f3ocus" else ["model.target_layers=[1]"]))
    folder = result.run_dir / "adapters" / "client_01"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "fedlrm.json"]
    lora = json.loads((folder / "adapter_config.json").read_text())
    blocks = [1] if algorithm != "f3ocus" else [0, 1]
    assert lora["peft_type"] == "LORA" and lora["r"] == 4 and lora["lora_alpha"] == 6
    assert sorted(lora["target_modules"]) == sorted(f"vision_model.encoder.layers.{b}.self_attn.{m}_proj"
                                                    for b in blocks for m in ("q", "v"))
    weights = load_file(folder / "adapter_model.safetensors")
    assert sorted(weights) == sorted(f"base_model.model.{t}.lora_{m}.weight"
                                     for t in lora["target_modules"] for m in ("A", "B"))
    assert any(weights[k].abs().max() > 0 for k in weights if "lora_B" in k), "lora_B was trained"
    meta = json.loads((folder / "fedlrm.json").read_text())
    assert meta["algorithm"] == algorithm and meta["client"] == 1 and meta["class_names"] == CLASS_NAMES

    # the model the run's client 1 evaluates with
    algo = get_algorithm(cfg)
    bundle = build_model(load_backbone(cfg.model), CLASS_NAMES, cfg, algo)
    expected_model = personalize(bundle, algo, cfg, 1, result.client_states[1], result.server_state, 1).eval()
    x = pixels(expected_model)
    with torch.no_grad():
        expected = expected_model(x)

    peft_model = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_dir), str(folder)).eval()
    torch.testing.assert_close(clip_logits(peft_model, tiny_clip_dir, x), expected, rtol=0, atol=1e-5)
    # the text tower carries no LoRA: only the adapted vision layers were wrapped
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert wrapped and all(".vision_model.encoder.layers." in n for n in wrapped)
    with torch.no_grad():
        torch.testing.assert_close(load_personalized(folder)(x), expected, rtol=0, atol=1e-5)

    merged = export_merged(folder, tmp_path / "merged")
    torch.testing.assert_close(clip_logits(CLIPModel.from_pretrained(merged).eval(), str(merged), x), expected,
                               rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(load_personalized(merged)(x), expected, rtol=0, atol=1e-5)
    assert read_meta(merged)["kind"] == "merged"


def test_layers_of_different_ranks_go_in_rank_and_alpha_patterns(tmp_path, tiny_clip_dir):
    cfg = load_config(None, [f"model.name={tiny_clip_dir}", "algorithm=fedavg", "adapter.rank=4"])
    algo = get_algorithm(cfg)
    bundle = build_model(load_backbone(cfg.model), CLASS_NAMES, cfg, algo)
    name, layer = next((n, m) for n, m in adapted_layers(bundle.model) if n.endswith("layers.0.self_attn.v_proj"))
    layer.experts["global"] = LoRAExpert(layer.in_features, layer.out_features, 2, 5.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(bundle.model).values():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    save_personalized(tmp_path / "c", bundle.model, cfg, CLASS_NAMES, 0, bundle.layout, {}, 1)
    lora = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert list(lora["rank_pattern"].values()) == [2] and list(lora["alpha_pattern"].values()) == [5.0]
    x = pixels(bundle.model)
    with torch.no_grad():
        expected = bundle.model.eval()(x)
        torch.testing.assert_close(load_personalized(tmp_path / "c")(x), expected, rtol=0, atol=1e-5)
    peft_model = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_dir), str(tmp_path / "c")).eval()
    assert peft_model.base_model.model.vision_model.encoder.layers[0].self_attn.v_proj.r["default"] == 2
    torch.testing.assert_close(clip_logits(peft_model, tiny_clip_dir, x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["fedlrm", "apfl"])
def test_mixtures_keep_fedlrm_files_and_cannot_be_merged(algorithm, tmp_path, tiny_clip_dir):
    cfg = load_config(None, [f"model.name={tiny_clip_dir}", f"algorithm={algorithm}", "adapter.rank=4"])
    algo = get_algorithm(cfg)
    bundle = build_model(load_backbone(cfg.model), CLASS_NAMES, cfg, algo)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(bundle.model).values():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    folder = tmp_path / "client_00"
    assert save_personalized(folder, bundle.model, cfg, CLASS_NAMES, 0, bundle.layout, {}, 2) == "fedlrm-format"
    assert sorted(p.name for p in folder.iterdir()) == ["fedlrm.json", "fedlrm_adapter.safetensors"]
    x = pixels(bundle.model)
    with torch.no_grad():
        torch.testing.assert_close(load_personalized(folder)(x), bundle.model.eval()(x))
    with pytest.raises(ModelError, match="cannot be merged"):
        export_merged(folder, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_loader_refuses_folders_of_neither_kind(tmp_path, tiny_clip_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a personalized fedlrm model"):
        load_personalized(tmp_path / "empty")
    cfg = load_config(None, [f"model.name={tiny_clip_dir}", "algorithm=fedavg", "adapter.rank=4"])
    bundle = build_model(load_backbone(cfg.model), CLASS_NAMES, cfg, get_algorithm(cfg))
    save_personalized(tmp_path / "peft-only", bundle.model, cfg, CLASS_NAMES, 0, bundle.layout, {}, 1)
    (tmp_path / "peft-only" / "fedlrm.json").unlink()
    with pytest.raises(ModelError, match="peft adapter without fedlrm.json"):
        load_personalized(tmp_path / "peft-only")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "fedlrm.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ModelError, match="not a fedlrm model description"):
        load_personalized(tmp_path / "other")


def test_a_run_moved_with_its_model_directory_loads_from_the_new_place(tmp_path, tiny_clip_dir):
    old = tmp_path / "old"
    shutil.copytree(tiny_clip_dir, old / "models" / "clip")
    cfg = load_config(None, [f"model.name={old / 'models' / 'clip'}", "algorithm=fedavg", "adapter.rank=4"])
    bundle = build_model(load_backbone(cfg.model), CLASS_NAMES, cfg, get_algorithm(cfg))
    with torch.no_grad():
        for p in adapter_parameters(bundle.model).values():
            p.add_(0.1)
    folder = old / "runs" / "r1" / "adapters" / "client_00"
    save_personalized(folder, bundle.model, cfg, CLASS_NAMES, 0, bundle.layout, {}, 1)
    x = pixels(bundle.model)
    with torch.no_grad():
        expected = bundle.model.eval()(x)
    meta = json.loads((folder / "fedlrm.json").read_text())
    assert meta["base_model"]["name"]["path"] == "../../../../models/clip"
    assert meta["config"]["model"]["name"] == "../../../../models/clip"
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "../../../../models/clip"

    new = tmp_path / "new"
    shutil.move(old, new)  # the recorded absolute path is gone
    moved = new / "runs" / "r1" / "adapters" / "client_00"
    model, info = read_personalized(moved)
    assert Path(info["base_model_resolved"]) == (new / "models" / "clip").resolve()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)

    # the run alone moved elsewhere: the absolute path is the fallback hint, then --base-model
    shutil.move(new / "runs", tmp_path / "elsewhere")
    old.mkdir()
    shutil.move(new / "models", old / "models")
    alone = tmp_path / "elsewhere" / "r1" / "adapters" / "client_00"
    assert Path(read_personalized(alone)[1]["base_model_resolved"]) == (old / "models" / "clip").resolve()
    shutil.move(old / "models", tmp_path / "kept")
    with pytest.raises(ModelError, match="base_model="):
        read_personalized(alone)
    with torch.no_grad():
        torch.testing.assert_close(load_personalized(alone, base_model=str(tmp_path / "kept" / "clip"))(x), expected)


def test_builtin_models_and_hub_ids_are_recorded_by_name(tmp_path):
    for name in ("builtin:tiny-clip", "openai/clip-vit-base-patch32"):
        assert base_model_record(ModelConfig(name=name), tmp_path)["name"] == {"id": name}


def test_folders_written_before_the_peft_format_still_load(tmp_path, tiny_clip_dir):
    from safetensors.torch import save_file

    from fedlrm.adapters import get_state
    from fedlrm.config import to_dict

    cfg = load_config(None, [f"model.name={tiny_clip_dir}", "algorithm=fedlrm", "adapter.rank=4"])
    bundle = build_model(load_backbone(cfg.model), CLASS_NAMES, cfg, get_algorithm(cfg))
    with torch.no_grad():
        for p in adapter_parameters(bundle.model).values():
            p.add_(0.05)
    old = tmp_path / "client_00"  # as fedlrm 0.1 wrote it
    old.mkdir()
    save_file(get_state(bundle.model), old / "adapter_model.safetensors")
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("data", "train", "output_dir", "name")}
    (old / "adapter_config.json").write_text(json.dumps({
        "format": "fedlrm-adapter/1", "client": 0, "round": 1, "layout": None, "class_names": CLASS_NAMES,
        "config": settings}))
    x = pixels(bundle.model)
    with torch.no_grad():
        torch.testing.assert_close(load_personalized(old)(x), bundle.model.eval()(x))
