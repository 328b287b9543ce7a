"""SigLIP vision transformer as Idefics3 / SmolVLM use it (variable-resolution patch mask, NaViT-style).

Config, then blocks (embeddings, attention, MLP, encoder layer), then the transformer. Matches
transformers' `Idefics3VisionTransformer`: patch conv -> fractional position ids bucketized onto the
pretrained square grid (so a partial image still sees positions spanning the whole grid) -> pre-LN encoder
with padding patches masked as keys -> post-layernorm.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from edge_mmm import kernels  # Triton attention / GELU on CUDA (kernels.use_triton); the torch code otherwise
from edge_mmm.models.embedding import embedding


@dataclass
class SiglipVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 512
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @classmethod
    def from_dict(cls, d: dict) -> "SiglipVisionConfig":
        """From an HF `vision_config` dict; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


_ACTS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.n = cfg.patches_per_side
        self.patch_size = cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = embedding(self.n * self.n, cfg.hidden_size)

    def position_ids(self, patch_mask: torch.Tensor) -> torch.Tensor:
        """(B, h, w) bool -> (B, h*w) ids: each real patch's fractional row/col mapped to the n x n grid."""
        b = patch_mask.shape[0]
        # same float32 arithmetic as transformers; `(x >= boundaries).sum` == bucketize(right=True), export-safe
        boundaries = torch.arange(1 / self.n, 1.0, 1 / self.n, device=patch_mask.device)
        nb_h = patch_mask[:, :, 0].sum(dim=1)
        nb_w = patch_mask[:, 0, :].sum(dim=1)
        h_idx = torch.arange(patch_mask.shape[1], device=patch_mask.device, dtype=torch.float32)
        w_idx = torch.arange(patch_mask.shape[2], device=patch_mask.device, dtype=torch.float32)
        frac_h = torch.clamp(h_idx[None, :] * (1.0 / nb_h)[:, None], max=1.0 - 1e-6)
        frac_w = torch.clamp(w_idx[None, :] * (1.0 / nb_w)[:, None], max=1.0 - 1e-6)
        bucket_h = (frac_h[..., None] >= boundaries).sum(-1)
        bucket_w = (frac_w[..., None] >= boundaries).sum(-1)
        ids = (bucket_h[:, :, None] * self.n + bucket_w[:, None, :]).reshape(b, -1)
        return torch.where(patch_mask.reshape(b, -1), ids, torch.zeros_like(ids))

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return x + self.position_embedding(self.position_ids(patch_mask))


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.head_dim = d // self.n_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        if kernels.use_triton(x) and (mask is None or tuple(mask.shape) == (b, 1, 1, t)):
            # the additive key-padding bias is 0 on real patches
            out = kernels.flash_attention(q, k, v, key_mask=None if mask is None else mask.reshape(b, t) == 0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.act = _ACTS[cfg.hidden_act]
        self.tanh_gelu = cfg.hidden_act in ("gelu_pytorch_tanh", "gelu_new")
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(kernels.gelu_tanh(h) if self.tanh_gelu and kernels.use_triton(h) else self.act(h))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class SiglipVisionTransformer(nn.Module):
    """pixel_values (N, 3, H, W) + patch mask (N, H/p, W/p) bool -> last hidden state (N, H*W/p^2, D)."""

    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, patch_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        p = self.config.patch_size
        n, _, h, w = pixel_values.shape
        if patch_mask is None:
            patch_mask = torch.ones(n, h // p, w // p, dtype=torch.bool, device=pixel_values.device)
        x = self.embeddings(pixel_values, patch_mask)
        # padding patches are masked as keys only (bidirectional attention over the real patches)
        key_mask = patch_mask.reshape(n, 1, 1, -1)
        bias = torch.zeros(key_mask.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~key_mask, torch.finfo(x.dtype).min)
        return self.post_layernorm(self.encoder(x, bias))


def patch_mask_from_pixel_mask(pixel_attention_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, H, W) pixel mask -> (N, H/p, W/p) bool: a patch is real if any of its pixels is."""
    n, h, w = pixel_attention_mask.shape
    h, w = h - h % patch_size, w - w % patch_size  # like unfold, drop a partial last patch
    m = pixel_attention_mask[:, :h, :w].reshape(n, h // patch_size, patch_size, w // patch_size, patch_size)
    return m.sum(dim=(2, 4)) > 0
