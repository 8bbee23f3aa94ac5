"""The pieces SA²VP adds to a frozen backbone, shared by the ViT and Swin versions.

- `LowRankPromptMap`: a learned token map U·W + b of rank r (method file §2, "Prompt pathway input").
- `PromptAdapter`: LN' → W_down → act → W_up, no residual (§2, "Cross_i").
- `SpatialCrossBlock`: Cross_i = Adapter_i(proj(LocalAttn(q, k, v)) + query state), where q, k, v and the
  output projection are the frozen block's own; without the adapter (ablation, paper Tab. 5) Cross_i is the
  projected attention output alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from sa2vp.models.local_attention import (
    Border,
    HeadMode,
    Kernel,
    build_dense_mask,
    build_tile_mask,
    spatial_cross_attention,
)


class LowRankPromptMap(nn.Module):
    """A (tokens × dim) prompt map factored as U (tokens × rank) · W (rank × dim) + b."""

    def __init__(self, tokens: int, rank: int, dim: int) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(1, tokens, rank))
        self.proj = nn.Linear(rank, dim)
        nn.init.trunc_normal_(self.tokens, std=0.02)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.normal_(self.proj.bias, std=1e-6)

    def forward(self) -> torch.Tensor:
        """The map, shape (1, tokens, dim): broadcast over the batch by the caller."""
        return self.proj(self.tokens)


# The release's LayerNorm ε (its ViT's and its adapters'); PyTorch's default 1e-5 shifts outputs by ~1e-4.
RELEASE_NORM_EPS = 1e-6


class PromptAdapter(nn.Module):
    """Adapts what one pathway reads from the other: drop(W_up · drop(act(W_down · LN'(x)))).

    As released: LN' with ε = 1e-6, dropout after the activation and again after W_up, W_down and W_up
    Xavier-uniform with biases N(0, 1e-6) (the Swin model re-initialises them: `reinit_linear_layers`).
    """

    def __init__(self, dim: int, hidden: int, activation: Literal["gelu", "relu"], dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=RELEASE_NORM_EPS)
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(hidden, dim)
        for linear in (self.down, self.up):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.up(self.drop(self.act(self.down(self.norm(x))))))


def reinit_linear_layers(module: nn.Module) -> None:
    """Every nn.Linear in `module` to truncated N(0, 0.02) weights and zero biases — what the Swin release's
    model-wide initialisation does to the prompt projection and the adapters after building them."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)


class SpatialCrossBlock(nn.Module):
    """Cross_i of one layer: the frozen block's attention, restricted to aligned windows, plus an adapter.

    Only the adapter is learned; the projections come from the frozen block and are passed in, so they are
    neither copied nor registered twice. The arguments are keyword-only: the frozen block's geometry (`dim`,
    `num_heads`, the token `grid`, `num_prefix` leading tokens that query globally) and the method's settings
    (`window` c or None for global, `border`, `head_mode`; `adapter_dim` t or None for the "w/o prompt adapter"
    ablation, its `activation`, and `dropout`). `sa2vp_core.cross_blocks` builds them from `SA2VPSettings`.
    """

    # Registered buffers (None when the attention is global); declared for the type checker.
    tile_mask: torch.Tensor | None
    dense_mask: torch.Tensor | None
    # The local attention's kernel: None chooses by grid and device (`local_attention.choose_kernel`); a
    # benchmark may pin one (the same maths either way).
    kernel: Kernel | None = None

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        grid: tuple[int, int],
        num_prefix: int,
        window: int | None,
        border: Border,
        head_mode: HeadMode,
        adapter_dim: int | None,
        activation: Literal["gelu", "relu"],
        dropout: float,
    ) -> None:
        super().__init__()
        self.window, self.border, self.head_mode = window, border, head_mode
        self.grid, self.num_prefix = grid, num_prefix
        self.drop = nn.Dropout(dropout)
        # adapter_dim None: the "w/o prompt adapter" ablation — no adapter parameters at all.
        self.adapter = None if adapter_dim is None else PromptAdapter(dim, adapter_dim, activation, dropout)
        # Built once here (buffers follow .to(device)), so forward has no Python-side caching; both kernels'
        # masks, since which kernel runs depends on the device (local_attention.choose_kernel).
        tile_mask = dense_mask = None
        if window is not None:
            heads = 1 if head_mode == "single" else num_heads
            tile_mask = build_tile_mask(grid, window, border, heads, torch.device("cpu"))
            dense_mask = build_dense_mask(grid, window, border, torch.device("cpu"))
        self.register_buffer("tile_mask", tile_mask, persistent=False)
        self.register_buffer("dense_mask", dense_mask, persistent=False)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        query_state: torch.Tensor,
        out_proj: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """q from the querying pathway, k/v from the other (per head, (B, H, L, D)); query_state is the
        querying pathway's un-normalised input to this layer (the residual h of §2).

        Without the adapter the attended output A is returned alone: A + h would add the residual h a second
        time (the block's output already carries it), which only the adapter's LN' and projections absorb.
        """
        attended = spatial_cross_attention(
            q,
            k,
            v,
            self.grid,
            self.window,
            num_prefix=self.num_prefix,
            border=self.border,
            head_mode=self.head_mode,
            tile_mask=self.tile_mask,
            dense_mask=self.dense_mask,
            kernel=self.kernel,
        )
        attended = self.drop(out_proj(attended))
        if self.adapter is None:
            return attended
        return self.adapter(attended + query_state)

    def extra_repr(self) -> str:
        window = "global" if self.window is None else f"{self.window}x{self.window}"
        adapter = "" if self.adapter is not None else ", no adapter"
        return f"window={window}, border={self.border}, head_mode={self.head_mode}{adapter}"
