"""Whisper as plain nn.Modules: blocks, encoder, decoder with an explicit KV cache (the config dataclass and
the ONNX names live in whisper_config.py, which needs no torch, and are re-exported here).

Parameter names follow openai-whisper's `model.py`, so its checkpoints load as they are. The decoder is a
pure function of (tokens, offset, cross K/V, past self K/V) -> (logits, new self K/V): the same code runs
eagerly and exports to ONNX. Cross-attention K/V are computed once per 30 s window by `cross_kv`.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edge_mmm import kernels  # Triton attention on CUDA (kernels.use_triton); the torch code otherwise
from edge_mmm.models.embedding import embedding
from edge_mmm.models.whisper_config import (DECODER_FILE, ENCODER_FILE, PRESETS, WhisperConfig,  # noqa: F401
                                            cross_names, onnx_files)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attention over [B, T, D] projections; `mask` is a bool [Tq, Tk] (True = may attend) or None."""
        b, tq, d = q.shape
        h = self.n_head
        q = q.view(b, tq, h, d // h).transpose(1, 2)
        k = k.view(b, k.shape[1], h, d // h).transpose(1, 2)
        v = v.view(b, v.shape[1], h, d // h).transpose(1, 2)
        if kernels.use_triton(q):
            # the only mask callers pass is the decoder's causal one (query i sees keys <= Tk - Tq + i)
            a = kernels.flash_attention(q, k, v, causal=mask is not None)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(a.transpose(1, 2).reshape(b, tq, d))

    def split_kv(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """K and V of `x` [B, S, D] in attention layout: K^T [B, H, Dh, S] and V [B, H, S, Dh].

        K^T is stored contiguously for the torch matmul (and the ONNX graph). When the Triton kernels run
        (CUDA), K is stored [B, H, S, Dh] with Dh contiguous, as the kernels read it, and returned as its
        transposed view: same shape, so callers (and `repeat_batch`) do not care which layout they hold.
        """
        b, s, d = x.shape
        h = self.n_head
        k = self.key(x).view(b, s, h, d // h)
        v = self.value(x).view(b, s, h, d // h).transpose(1, 2)
        if kernels.use_triton(x):
            return k.transpose(1, 2).contiguous().transpose(-1, -2), v.contiguous()
        return k.permute(0, 2, 3, 1).contiguous(), v.contiguous()

    def attend_split(self, q: Tensor, k_t: Tensor, v: Tensor) -> Tensor:
        """Attention of q [B, T, D] over keys/values already in `split_kv` layout (no per-step transposes)."""
        b, tq, d = q.shape
        h = self.n_head
        q = q.view(b, tq, h, d // h).transpose(1, 2)
        if kernels.use_triton(q):
            k = k_t.transpose(-1, -2)  # [B, H, S, Dh], Dh contiguous in the Triton layout of split_kv
            if tq == 1:  # one decode step: split-KV flash decoding over the 1500 audio positions
                lens = torch.full((b,), k.shape[2], dtype=torch.int32, device=q.device)
                a = kernels.decode_attention(q[:, :, 0], k, v, lens)[:, :, None]
            else:
                a = kernels.flash_attention(q, k, v, causal=False)
        else:
            scores = torch.matmul(q * (d // h) ** -0.5, k_t)
            a = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(a.transpose(1, 2).reshape(b, tq, d))


def repeat_batch(t: Tensor, group: int) -> Tensor:
    """`t` [1, ...] repeated `group` times along the batch, keeping its memory layout (see `split_kv`)."""
    if t.dim() == 4 and t.stride(-2) == 1 and t.stride(-1) != 1:  # a K^T view over Dh-contiguous storage
        return t.transpose(-1, -2).expand(group, -1, -1, -1).contiguous().transpose(-1, -2)
    return t.expand(group, *t.shape[1:]).contiguous()


class EncoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, n_state * 4), nn.GELU(), nn.Linear(n_state * 4, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: Tensor) -> Tensor:
        h = self.attn_ln(x)
        x = x + self.attn.attend(self.attn.query(h), self.attn.key(h), self.attn.value(h))
        return x + self.mlp(self.mlp_ln(x))


class DecoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head)
        self.cross_attn_ln = LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, n_state * 4), nn.GELU(), nn.Linear(n_state * 4, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: Tensor, mask: Tensor, cross_k: Tensor, cross_v: Tensor,
                past_k: Tensor, past_v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        h = self.attn_ln(x)
        k = torch.cat([past_k, self.attn.key(h)], dim=1)
        v = torch.cat([past_v, self.attn.value(h)], dim=1)
        x = x + self.attn.attend(self.attn.query(h), k, v, mask)
        x = x + self.cross_attn.attend_split(self.cross_attn.query(self.cross_attn_ln(x)), cross_k, cross_v)
        x = x + self.mlp(self.mlp_ln(x))
        return x, k, v


class AudioEncoder(nn.Module):
    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.n_audio_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.n_audio_state, cfg.n_audio_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", torch.zeros(cfg.n_audio_ctx, cfg.n_audio_state))
        self.blocks = nn.ModuleList(EncoderBlock(cfg.n_audio_state, cfg.n_audio_head)
                                    for _ in range(cfg.n_audio_layer))
        self.ln_post = LayerNorm(cfg.n_audio_state)

    def forward(self, mel: Tensor) -> Tensor:
        """mel [B, n_mels, 2*n_audio_ctx] -> audio features [B, n_audio_ctx, n_audio_state]."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.token_embedding = embedding(cfg.n_vocab, cfg.n_text_state)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.n_text_ctx, cfg.n_text_state))
        self.blocks = nn.ModuleList(DecoderBlock(cfg.n_text_state, cfg.n_text_head)
                                    for _ in range(cfg.n_text_layer))
        self.ln = LayerNorm(cfg.n_text_state)

    def cross_kv(self, audio_features: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
        """Per layer, cross-attention K^T [B, H, Dh, n_audio_ctx] and V [B, H, n_audio_ctx, Dh], computed once
        per window in the layout the decoder multiplies with directly (one tensor per layer: an ONNX graph
        then reads them in place instead of slicing a stacked copy every step)."""
        kv = [blk.cross_attn.split_kv(audio_features) for blk in self.blocks]
        return [k for k, _ in kv], [v for _, v in kv]

    def forward(self, tokens: Tensor, offset: Tensor, cross_k: Sequence[Tensor], cross_v: Sequence[Tensor],
                self_k: Tensor, self_v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """tokens [B, T] at positions offset..offset+T-1; cross_k/v from `cross_kv`; self_k/v [L, B, offset, D]
        (the cache so far).

        Returns float32 logits [B, T, n_vocab] and the cache extended by T positions.
        """
        t = tokens.shape[1]
        positions = offset + torch.arange(t, device=tokens.device)
        x = self.token_embedding(tokens) + F.embedding(positions, self.positional_embedding)
        x = x.to(cross_k[0].dtype)
        total = self_k.shape[2] + t
        # query i (absolute position offset+i) may attend to keys 0..offset+i
        mask = torch.arange(total, device=tokens.device)[None, :] <= positions[:, None]
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, mask, cross_k[i], cross_v[i], self_k[i], self_v[i])
            new_k.append(k)
            new_v.append(v)
        x = self.ln(x)
        # F.linear on 2-D input exports as one Gemm(transB=1) that shares the embedding initializer,
        # instead of a second, transposed 80 MB copy of it (tiny.en) in the ONNX file.
        weight = self.token_embedding.weight.to(x.dtype)
        logits = F.linear(x.reshape(-1, x.shape[-1]), weight).reshape(x.shape[0], t, -1).float()
        return logits, torch.stack(new_k), torch.stack(new_v)


class Whisper(nn.Module):
    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.config = cfg
        self.encoder = AudioEncoder(cfg)
        self.decoder = TextDecoder(cfg)

    def empty_cache(self, batch: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Tuple[Tensor, Tensor]:
        """An empty self-attention cache: two [L, batch, 0, D] tensors (on the model's device by default)."""
        cfg = self.config
        shape = (cfg.n_text_layer, batch, 0, cfg.n_text_state)
        device = self.decoder.token_embedding.weight.device if device is None else device
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
