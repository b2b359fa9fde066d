"""A dual encoder (transformers' VisionTextDualEncoderModel: CLIP's ViT beside a BERT-style text model)
loads through the same layer as CLIP, trains with every side a method adapts, and exports as peft LoRA."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import COLOURS, make_tiny_dual_encoder_dir
from peft import PeftModel
from PIL import Image
from transformers import AutoTokenizer, VisionTextDualEncoderModel

from fedlrm.adapters import adapted_layers
from fedlrm.algorithms import get_algorithm, load_config
from fedlrm.experiment import run_experiment
from fedlrm.federation.export import export_merged, load_personalized
from fedlrm.federation.task import build_model, personalize
from fedlrm.models import load_backbone
from fedlrm.models.backbone import HFDualEncoderBackbone

CLASS_NAMES = ["red", "green", "blue", "yellow", "white", "black"]


def run_on(dual_dir, dataset, tmp_path, *extra):
    cfg = load_config(None, [
        f"model.name={dual_dir}", "data.source=parquet", f"data.train={dataset['train']}",
        f"data.test={dataset['test']}", "data.num_clients=2", "data.shards_per_client=3", "data.shots=2",
        "data.test_per_client=4", "train.rounds=2", "train.batch_size=8", "train.lr=0.05", "adapter.rank=4",
        f"output_dir={tmp_path / 'runs'}", "seed=1", *extra])
    return cfg, run_experiment(cfg, progress=False)


def test_the_dual_encoder_pools_text_by_the_masked_mean_and_projects_it(tiny_dual_dir):
    backbone = load_backbone(load_config(None, [f"model.name={tiny_dual_dir}"]).model)
    assert isinstance(backbone, HFDualEncoderBackbone) and backbone.text_pooling == "mean"
    prompts = ["a photo of a red.", "a blue."]
    text_model, projection = backbone.text_tower()
    tokens = AutoTokenizer.from_pretrained(tiny_dual_dir)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = text_model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        expected = F.normalize(projection((hidden * mask).sum(1) / mask.sum(1)), dim=-1)
        torch.testing.assert_close(backbone.text_features(prompts), expected)
        images = torch.rand(2, 3, 16, 16)
        features = backbone.image_features(images)
    assert features.shape == (2, 16) and torch.allclose(features.norm(dim=-1), torch.ones(2))
    assert backbone.text_width() == 32 and backbone.text_target_modules(["q_proj", "v_proj"]) == ["query", "value"]


def test_the_pooler_output_is_what_transformers_gives_as_text_features(tmp_path):
    folder = make_tiny_dual_encoder_dir(tmp_path / "pooler", text_pooling="pooler")
    backbone = load_backbone(load_config(None, [f"model.name={folder}"]).model)
    model = VisionTextDualEncoderModel.from_pretrained(folder)
    tokens = AutoTokenizer.from_pretrained(folder)(["a photo of a red."], return_tensors="pt")
    with torch.no_grad():
        theirs = model.get_text_features(**tokens)
        theirs = theirs if torch.is_tensor(theirs) else theirs.pooler_output
        torch.testing.assert_close(backbone.text_features(["a photo of a red."]), F.normalize(theirs, dim=-1))


@pytest.mark.parametrize("algorithm, extra", [
    ("fedlrm", ["model.adapt_encoders=[image,text]"]),  # LoRA on BERT's query and value too
    ("promptfl", []),  # CoOp's context in place of the placeholder word's embedding
    ("fedotp", []),
])
def test_methods_train_on_a_dual_encoder(tiny_dual_dir, tiny_dataset, tmp_path, algorithm, extra):
    cfg, result = run_on(tiny_dual_dir, tiny_dataset, tmp_path, f"algorithm={algorithm}", *extra)
    assert result.summary["rejected_updates"] == 0 and len(result.round_rows) == 2
    if extra:
        text_layers = {k.split(".experts.")[0].rsplit(".", 1)[-1] for k in result.client_states[0]
                       if k.startswith("text_encoder.") and ".experts." in k}
        assert text_layers == {"query", "value"}


def test_a_single_lora_client_of_a_dual_encoder_is_a_peft_adapter_that_merges(tiny_dual_dir, tiny_dataset, tmp_path):
    cfg, result = run_on(tiny_dual_dir, tiny_dataset, tmp_path, "algorithm=fedavg")
    folder = result.run_dir / "adapters" / "client_01"
    lora = json.loads((folder / "adapter_config.json").read_text())
    assert lora["auto_mapping"]["base_model_class"] == "VisionTextDualEncoderModel"
    algorithm = get_algorithm(cfg)
    bundle = build_model(load_backbone(cfg.model), CLASS_NAMES, cfg, algorithm)
    expected_model = personalize(bundle, algorithm, cfg, 1, result.client_states[1], result.server_state, 2).eval()
    x = expected_model.preprocess([Image.new("RGB", (20, 20), c) for c in COLOURS[:4]])
    with torch.no_grad():
        expected = expected_model(x)
        peft_model = PeftModel.from_pretrained(VisionTextDualEncoderModel.from_pretrained(tiny_dual_dir), str(folder))
        wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
        assert wrapped and all(".vision_model.encoder.layers." in n for n in wrapped)
        image = peft_model.get_image_features(pixel_values=x)
        image = F.normalize(image if torch.is_tensor(image) else image.pooler_output, dim=-1)
        text = expected_model.backbone.text_features([f"a photo of a {c}." for c in CLASS_NAMES])
        scale = peft_model.base_model.model.logit_scale.exp()
        torch.testing.assert_close(scale * image @ text.t(), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(load_personalized(folder)(x), expected, rtol=0, atol=1e-5)
        merged = export_merged(folder, tmp_path / "merged")
        assert json.loads((merged / "config.json").read_text())["model_type"] == "vision-text-dual-encoder"
        torch.testing.assert_close(load_personalized(merged)(x), expected, rtol=0, atol=1e-5)
    assert not any(hasattr(m, "lora_A") for m in VisionTextDualEncoderModel.from_pretrained(merged).modules())
    assert [n for n, _ in adapted_layers(load_personalized(merged))] == []
