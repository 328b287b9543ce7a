"""Idefics3 / SmolVLM: SigLIP tower -> pixel-shuffle connector -> Llama-architecture LM.

Config, connector, vision part (tower + connector, the unit that is cached and exported to ONNX), then the
VLM, whose forward takes exactly `input_ids, pixel_values, pixel_attention_mask` and returns logits, like
transformers' `Idefics3ForConditionalGeneration`. Image features replace the LM's input embeddings at the
`<image>` token positions, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from edge_mmm.errors import InputError
from edge_mmm.models.llama import Llama, LlamaConfig
from edge_mmm.models.siglip import SiglipVisionConfig, SiglipVisionTransformer, patch_mask_from_pixel_mask


@dataclass
class Idefics3Config:
    vision: SiglipVisionConfig
    text: LlamaConfig
    scale_factor: int = 2
    image_token_id: int = 128257

    @property
    def image_seq_len(self) -> int:
        """`<image>` tokens per tile: (image_size / patch_size)^2 / scale_factor^2."""
        return self.vision.patches_per_side ** 2 // self.scale_factor ** 2


class Idefics3Connector(nn.Module):
    """Pixel shuffle (space-to-depth on the square patch grid), then a bias-free projection to the LM width."""

    def __init__(self, vision_dim: int, text_dim: int, scale_factor: int):
        super().__init__()
        self.scale_factor = scale_factor
        self.proj = nn.Linear(vision_dim * scale_factor ** 2, text_dim, bias=False)

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale_factor
        b, seq, d = x.shape
        side = int(seq ** 0.5)
        x = x.view(b, side, side // s, d * s).permute(0, 2, 1, 3)
        x = x.reshape(b, side // s, side // s, d * s * s).permute(0, 2, 1, 3)
        return x.reshape(b, seq // (s * s), d * s * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pixel_shuffle(x))


class Idefics3Vision(nn.Module):
    """Tiles (N, 3, S, S) + patch mask -> LM-space features (N, image_seq_len, text_dim)."""

    def __init__(self, cfg: Idefics3Config):
        super().__init__()
        self.patch_size = cfg.vision.patch_size
        self.vision_model = SiglipVisionTransformer(cfg.vision)
        self.connector = Idefics3Connector(cfg.vision.hidden_size, cfg.text.hidden_size, cfg.scale_factor)

    def forward(self, pixel_values: torch.Tensor, patch_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.connector(self.vision_model(pixel_values, patch_mask))

    def encode(self, pixel_values: torch.Tensor, pixel_attention_mask: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """Processor output (B, T, 3, H, W) [+ (B, T, H, W)] -> features of the real tiles, (n_real*seq, D)."""
        dtype = next(self.parameters()).dtype
        pv, patch_mask = real_tiles(pixel_values.to(dtype), pixel_attention_mask, self.patch_size)
        feats = self(pv, patch_mask)
        return feats.reshape(-1, feats.shape[-1])


def real_tiles(pixel_values: torch.Tensor, pixel_attention_mask: Optional[torch.Tensor], patch_size: int
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flatten (B, T, ...) to tiles, drop all-zero padding tiles (as transformers does), make patch masks."""
    b, t = pixel_values.shape[:2]
    pv = pixel_values.reshape(b * t, *pixel_values.shape[2:])
    real = (pv == 0.0).sum(dim=(-1, -2, -3)) != pv.shape[1:].numel()
    pv = pv[real]
    if pixel_attention_mask is None:
        pm = torch.ones(pv.shape[0], pv.shape[2], pv.shape[3], dtype=torch.bool, device=pv.device)
    else:
        pm = pixel_attention_mask.reshape(b * t, *pixel_attention_mask.shape[2:])[real]
    return pv.contiguous(), patch_mask_from_pixel_mask(pm, patch_size)


def merge_image_features(input_ids: torch.Tensor, inputs_embeds: torch.Tensor, features: torch.Tensor,
                         image_token_id: int) -> torch.Tensor:
    """Write `features` (n, D), in order, over the embeddings at the `<image>` positions."""
    mask = input_ids == image_token_id
    n = int(mask.sum())
    if n != features.shape[0]:
        raise InputError(f"the prompt has {n} image tokens but the images give {features.shape[0]} features")
    out = inputs_embeds.clone()
    out[mask] = features.to(out.dtype)
    return out


class Idefics3ForConditionalGeneration(nn.Module):
    """The VLM. `forward(input_ids, pixel_values, pixel_attention_mask)` -> logits (B, T, vocab)."""

    def __init__(self, cfg: Idefics3Config, vision: Optional[Idefics3Vision] = None, lm: Optional[Llama] = None):
        super().__init__()
        self.config = cfg
        self.vision = vision if vision is not None else Idefics3Vision(cfg)
        self.lm = lm if lm is not None else Llama(cfg.text)

    def embed(self, input_ids: torch.Tensor, image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with image features spliced in at the `<image>` tokens."""
        emb = self.lm.embed_tokens(input_ids)
        if image_features is None:
            if bool((input_ids == self.config.image_token_id).any()):
                raise InputError("the prompt has image tokens but no image was given")
            return emb
        return merge_image_features(input_ids, emb, image_features, self.config.image_token_id)

    def forward(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                pixel_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        feats = None if pixel_values is None else self.vision.encode(pixel_values, pixel_attention_mask)
        return self.lm(inputs_embeds=self.embed(input_ids, feats))
