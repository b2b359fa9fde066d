"""`nn.MultiheadAttention` with its fused input projection split into q, k, v linears.

open_clip's ViTs use `nn.MultiheadAttention`, whose q/k/v weights live in one
`in_proj_weight` and whose `out_proj` is read as a tensor rather than called. LoRA on the
q and v projections needs them as `nn.Linear` modules that are actually called; this
module computes the same function with four real linears.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitMultiheadAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only self-attention with one embedding size and no bias_k/zero_attn is supported")
        d = mha.embed_dim
        self.num_heads, self.batch_first, self.dropout = mha.num_heads, mha.batch_first, mha.dropout
        has_bias = mha.in_proj_bias is not None
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=has_bias) for _ in range(3))
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * d:(i + 1) * d])
                if has_bias:
                    proj.bias.copy_(mha.in_proj_bias[i * d:(i + 1) * d])
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query, key, value, need_weights=False, attn_mask=None, key_padding_mask=None, **_):
        if key_padding_mask is not None:
            raise NotImplementedError("key_padding_mask is not used by CLIP image encoders")
        if not self.batch_first:  # (L, B, D) -> (B, L, D)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, length, d = query.shape
        heads = lambda t: t.reshape(b, -1, self.num_heads, d // self.num_heads).transpose(1, 2)
        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # nn.MultiheadAttention masks True; sdpa keeps True
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, d))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def split_attention(root: nn.Module) -> int:
    """Replace every `nn.MultiheadAttention` under `root`; returns how many were replaced."""
    targets = [(n, m) for n, m in root.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, SplitMultiheadAttention(module))
    return len(targets)
