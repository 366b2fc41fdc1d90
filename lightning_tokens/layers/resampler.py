"""The Flamingo-style Perceiver resampler: a variable number of media features → a fixed number of tokens.

Each layer lets ``num_latents`` learned latents attend to the concatenation of the media features and
the latents themselves, then applies a feed-forward block, both residual; a final LayerNorm closes the
stack. This is the resampler GVT uses (``gvt/modules/perceiver.py`` in TencentARC/GVT, after Alayrac et
al. 2022), which the GVT paper sometimes calls a Q-Former.

Example:
    >>> resampler = PerceiverResampler(dim=16, depth=2, heads=2, dim_head=8, num_latents=4)
    >>> resampler(torch.randn(3, 49, 16)).shape
    torch.Size([3, 4, 16])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PerceiverAttention(nn.Module):
    """Latents (queries) attend to ``cat(media, latents)`` (keys and values), each LayerNorm-ed first."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        media, latents = self.norm_media(media), self.norm_latents(latents)
        context = torch.cat([media, latents], dim=1)
        q = self._split(self.to_q(latents))
        k, v = (self._split(t) for t in self.to_kv(context).chunk(2, dim=-1))
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class PerceiverResampler(nn.Module):
    """``(B, N, dim)`` media features → ``(B, num_latents, dim)`` tokens.

    Args:
        dim: feature width (media and latents).
        depth: number of (attention, feed-forward) layers (GVT: 6).
        heads: attention heads (GVT: 16).
        dim_head: width per head (GVT: 96).
        num_latents: output tokens (GVT: 32).
        ff_mult: feed-forward expansion (GVT: 4).
    """

    def __init__(
        self, dim: int, depth: int = 6, heads: int = 16, dim_head: int = 96, num_latents: int = 32, ff_mult: int = 4
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), _feed_forward(dim, ff_mult)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    @property
    def num_latents(self) -> int:
        return self.latents.shape[0]

    def forward(self, media: Tensor) -> Tensor:
        latents = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1)
        for attention, feed_forward in self.layers:
            latents = attention(media, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm(latents)
