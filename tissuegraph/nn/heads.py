"""Heads on top of the GNN embeddings: contrastive projections, 3x3 localisation,
expression decoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "Bilinear",
    "ProjectionHead",
    "LocalisationHead",
    "ExpressionDecoder",
    "NeighbourDecoder",
]


class Bilinear(nn.Bilinear):
    """``nn.Bilinear`` (same parameters, initialisation and state-dict keys) computed as
    ``((x1 @ W_o) * x2).sum(-1) + b_o``.

    ``torch.bilinear``'s backward on CPU broadcasts an ``[N, in1, in2]`` product: on a
    3,639-spot tile it was 90% of a DGI training step. This form is the same function with
    two matrix products. Shapes: ``[N, in1]``, ``[N, in2]`` -> ``[N, out]``.
    """

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        w = self.weight  # [out, in1, in2]
        if w.shape[0] == 1:
            out = ((x1 @ w[0]) * x2).sum(-1, keepdim=True)
        else:
            out = torch.einsum("ni,oij,nj->no", x1, w, x2)
        return out + self.bias if self.bias is not None else out


class ProjectionHead(nn.Module):
    """``Linear -> GELU -> Linear`` into the contrastive space (CLIP/SimCLR style).

    Shapes: ``[N, in_dim]`` -> ``[N, out_dim]`` (not normalised).
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


class LocalisationHead(nn.Module):
    """9-way classifier of a child patch's cell in its parent's 3x3 grid.

    Shapes: ``child`` ``[E, D]``, ``parent`` ``[E, D]`` -> logits ``[E, 9]``.
    """

    def __init__(self, dim: int, n_cells: int = 9):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Linear(dim, n_cells)
        )

    def forward(self, child: Tensor, parent: Tensor) -> Tensor:
        return self.net(torch.cat([child, parent], dim=-1))


class ExpressionDecoder(nn.Module):
    """MLP from a spot embedding to the panel's normalised expression.

    Shapes: ``[N, D]`` -> ``[N, G]``.
    """

    def __init__(self, dim: int, n_genes: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or 2 * dim
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.LayerNorm(hidden_dim),
            nn.Linear(hidden_dim, n_genes),
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


class NeighbourDecoder(nn.Module):
    r"""One mean-aggregation layer that decodes a spot from itself and its spot neighbours.

    .. math:: r_i = W_1 h_i + W_2 \tfrac{1}{|N(i)|} \textstyle\sum_{j \in N(i)} h_j

    Used by the masked-feature objective after re-masking (the hidden spots' rows of ``h``
    set to zero), so a hidden spot is decoded from what its neighbours carry.

    Shapes: ``h`` ``[N, D]``, ``edge_index`` ``[2, E]`` (src -> dst) -> ``[N, out_dim]``.
    """

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.self_lin = nn.Linear(dim, out_dim)
        self.nbr_lin = nn.Linear(dim, out_dim, bias=False)

    def forward(self, h: Tensor, edge_index: Tensor) -> Tensor:
        src, dst = edge_index
        agg = torch.zeros_like(h).index_add_(0, dst, h.index_select(0, src))
        deg = torch.bincount(dst, minlength=h.shape[0]).clamp_min(1).to(h.dtype)
        return self.self_lin(h) + self.nbr_lin(agg / deg[:, None])
