"""Backbones: attention splitting for open_clip, and open_clip itself where installed."""

import pytest
import torch
from torch import nn

from fedlrm.models.attention import SplitMultiheadAttention, split_attention


@pytest.mark.parametrize("batch_first", [False, True])
def test_split_attention_computes_what_multihead_attention_does(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    split = SplitMultiheadAttention(mha).eval()
    x = torch.randn(5, 3, 16)  # (L, B, D) or (B, L, D)
    expected, _ = mha(x, x, x, need_weights=False)
    got, _ = split(x, x, x, need_weights=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    mask = torch.triu(torch.full((5, 5) if not batch_first else (3, 3), float("-inf")), 1)
    expected, _ = mha(x, x, x, need_weights=False, attn_mask=mask)
    got, _ = split(x, x, x, attn_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_split_attention_replaces_every_block():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Sequential(nn.MultiheadAttention(8, 2)))
    assert split_attention(model) == 2
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "0.q_proj" in names and "1.0.v_proj" in names


def test_open_clip_backend_adapts_q_and_v():
    open_clip = pytest.importorskip("open_clip", reason="optional extra fedlrm[open_clip] (needs torchvision)")
    from fedlrm.adapters import AdaptedLinear, LoRAExpert, inject_adapters
    from fedlrm.models.backbone import OpenClipBackbone

    model, _, transform = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    backbone = OpenClipBackbone(model, open_clip.get_tokenizer("ViT-B-32"), transform).freeze()
    x = torch.randn(1, 3, 224, 224)
    before = backbone.image_features(x)
    adapted = inject_adapters(backbone.image_encoder, ["q_proj", "v_proj"],
                              lambda lin: AdaptedLinear(lin, {"global": LoRAExpert(lin.in_features,
                                                                                   lin.out_features, 2, 2)}))
    assert len(adapted) == 24
    torch.testing.assert_close(backbone.image_features(x), before, atol=1e-5, rtol=1e-5)
    assert backbone.text_features(["a photo of a cat."]).shape == (1, 512)
