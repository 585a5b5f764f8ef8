"""Perceiver resampler: learned or given query tokens cross-attending to image features.

Used twice by MagicMirror: as PhotoMaker-V2's ID perceiver (queries = ArcFace tokens, keys =
CLIP last hidden state) and as the face-branch Q-Former (32 learned queries over the CLIP
penultimate hidden state). Parameter names follow PhotoMaker-V2's checkpoint
(``layers.<i>.0`` attention, ``layers.<i>.1`` feed-forward) so its weights load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class PerceiverAttention(nn.Module):
    """Queries from the latents; keys/values from ``[features; latents]`` (no biases)."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)  # features
        self.norm2 = nn.LayerNorm(dim)  # latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # features [B, N, dim], latents [B, L, dim] -> [B, L, dim]
        features, latents = self.norm1(features), self.norm2(latents)
        b, length, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        # softmax(q k^T / sqrt(d)) v, with the softmax in float32 for fp16/bf16 stability
        scores = (q @ k.transpose(-2, -1)).float() * self.dim_head**-0.5
        out = scores.softmax(dim=-1).to(v.dtype) @ v  # [B, H, L, dh]
        return self.to_out(out.transpose(1, 2).reshape(b, length, -1))


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverResampler(nn.Module):
    """``depth`` x (attention + FF) residual layers over projected features, then proj + LayerNorm."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, embedding_dim: int, output_dim: int,
                 ff_mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)]) for _ in range(depth))

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        # latents [B, L, dim], features [B, N, embedding_dim] -> [B, L, output_dim]
        features = self.proj_in(features)
        for attn, ff in self.layers:
            latents = attn(features, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


__all__ = ["PerceiverAttention", "PerceiverResampler", "feed_forward"]
