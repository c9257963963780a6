"""Node encoders: expression MLP (spots), timm image backbone or feature projection (patches),
learned embeddings (genes, pathways)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tissuegraph._timm import check_timm_name, create_backbone
from tissuegraph.errors import ConfigError, InputError

__all__ = [
    "ExpressionEncoder",
    "ImageEncoder",
    "FeatureEncoder",
    "create_backbone",
    "check_timm_name",
]


class ExpressionEncoder(nn.Module):
    r"""Standardisation (optional PCA basis) then a two-layer MLP for a spot's expression.

    .. math::
        z = \mathrm{clip}\big((x - \mu) / \sigma, \pm c\big)\,[B], \qquad
        h = \mathrm{LN}(W_2\,\mathrm{GELU}(\mathrm{LN}(W_1 z)))

    ``mu``, ``sigma`` and ``B`` are buffers fitted on the fit slides at build time
    (:mod:`tissuegraph.graph.standardize`); they are saved with the model and reused unchanged
    on every new slide. Without them (``standardize=False``) ``z = x``.

    Spots whose expression is hidden (masked-expression modelling, or prediction from the
    image alone) get a learned mask token instead.

    Parameters
    ----------
    in_dim
        Panel size ``G``.
    hidden_dim, out_dim
        Width of the hidden layer (0: a single linear projection, no hidden layer) and of
        the output.
    standardize
        Hold ``mean`` / ``sd`` buffers (set them with :meth:`set_standardization`).
    n_pcs
        Width ``k`` of the PCA basis ``B`` ``[G, k]`` (0: none).
    clip
        Clip of the standardised values.

    Shapes: ``x`` ``[N, G]`` (float16/float32), ``mask`` optional bool ``[N]`` -> ``[N, out_dim]``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        dropout: float = 0.0,
        *,
        standardize: bool = False,
        n_pcs: int = 0,
        clip: float = 10.0,
    ):
        super().__init__()
        self.standardize = bool(standardize)
        self.n_pcs = int(n_pcs) if standardize else 0
        self.clip = float(clip)
        if self.standardize:
            self.register_buffer("std_mean", torch.zeros(in_dim))
            self.register_buffer("std_sd", torch.ones(in_dim))
            if self.n_pcs:
                self.register_buffer("std_basis", torch.zeros(in_dim, self.n_pcs))
        self.input_dim = self.n_pcs or in_dim
        if hidden_dim > 0:
            self.net = nn.Sequential(
                nn.Linear(self.input_dim, hidden_dim),
                nn.LayerNorm(hidden_dim),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_dim, out_dim),
                nn.LayerNorm(out_dim),
            )
        else:  # one linear projection: the graph convolutions see the input itself
            self.net = nn.Sequential(nn.Linear(self.input_dim, out_dim))
        self.mask_token = nn.Parameter(torch.zeros(out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.net:
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        nn.init.normal_(self.mask_token, std=0.02)

    @torch.no_grad()
    def set_standardization(self, mean: Tensor, sd: Tensor, basis: Tensor | None = None) -> None:
        """Copy fitted statistics into the buffers (shapes must match the panel / ``n_pcs``)."""
        if not self.standardize:
            raise ConfigError("this expression encoder was built without standardisation")
        if mean.shape != self.std_mean.shape or sd.shape != self.std_sd.shape:
            raise InputError(
                f"standardisation statistics cover {mean.shape[0]} genes, the panel has "
                f"{self.std_mean.shape[0]}: rebuild the graphs"
            )
        self.std_mean.copy_(mean)
        self.std_sd.copy_(sd.clamp_min(1e-8))
        if self.n_pcs:
            if basis is None or tuple(basis.shape) != tuple(self.std_basis.shape):
                raise InputError(
                    f"the PCA basis has shape {None if basis is None else tuple(basis.shape)}, "
                    f"the model expects {tuple(self.std_basis.shape)}: rebuild the graphs"
                )
            self.std_basis.copy_(basis)

    def standardized(self, x: Tensor) -> Tensor:
        """The encoder's input ``z`` ``[N, k or G]`` (also the masked-feature target)."""
        z = x.float()
        if self.standardize:
            z = ((z - self.std_mean) / self.std_sd).clamp(-self.clip, self.clip)
            if self.n_pcs:
                z = z @ self.std_basis
        return z

    def forward(self, x: Tensor, mask: Tensor | None = None, z: Tensor | None = None) -> Tensor:
        """``z``: :meth:`standardized` of ``x`` computed earlier (skips the standardisation)."""
        h = self.net(z.float() if z is not None else self.standardized(x))
        if mask is not None and bool(mask.any()):
            h = torch.where(mask[:, None], self.mask_token.to(h.dtype).expand_as(h), h)
        return h


class ImageEncoder(nn.Module):
    r"""A timm backbone shared by all patch scales, plus a learned scale embedding.

    .. math:: h = \mathrm{LN}(W f_\theta(\mathrm{norm}(I)) + e_{k})

    Parameters
    ----------
    name, pretrained, checkpoint_path
        Passed to :func:`create_backbone`.
    out_dim
        Output width.
    n_scales
        Number of patch scales (size of the scale embedding).
    freeze
        Keep the backbone fixed (no gradients, always in eval mode).
    input_px
        Resize crops to this side before the backbone (``None``: as stored).
    channels_last
        Keep the backbone's weights and convert each input batch to ``torch.channels_last``.

    Shapes: ``img`` uint8 ``[M, 3, S, S]``, ``scale`` int64 ``[M]`` -> ``[M, out_dim]``.
    """

    def __init__(
        self,
        name: str,
        out_dim: int,
        n_scales: int,
        *,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        freeze: bool = False,
        input_px: int | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        self.backbone = create_backbone(
            name, pretrained=pretrained, checkpoint_path=checkpoint_path
        )
        self.channels_last = bool(channels_last)
        if self.channels_last:  # Module.to(device) and load_state_dict keep the format
            self.backbone.to(memory_format=torch.channels_last)
        cfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.freeze = bool(freeze)
        self.input_px = input_px
        if self.freeze:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
        self.proj = nn.Linear(self.backbone.num_features, out_dim)
        self.scale_emb = nn.Embedding(max(1, n_scales), out_dim)
        self.norm = nn.LayerNorm(out_dim)
        nn.init.normal_(self.scale_emb.weight, std=0.02)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.backbone.eval()
        return self

    def features(self, img: Tensor) -> Tensor:
        """Backbone features of uint8 crops ``[M, 3, S, S]`` -> ``[M, F]``."""
        x = (img.float() - self.mean) / self.std
        if self.input_px and x.shape[-1] != self.input_px:
            x = nn.functional.interpolate(
                x, size=(self.input_px, self.input_px), mode="bilinear", align_corners=False
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.freeze:
            with torch.no_grad():
                return self.backbone(x)
        return self.backbone(x)

    def forward(self, img: Tensor, scale: Tensor) -> Tensor:
        return self.norm(self.proj(self.features(img)) + self.scale_emb(scale))


class FeatureEncoder(nn.Module):
    r"""Linear projection of stored frozen-encoder features plus a scale embedding.

    Shapes: ``feat`` ``[M, D]`` (float16/float32), ``scale`` int64 ``[M]`` -> ``[M, out_dim]``.
    """

    def __init__(self, in_dim: int, out_dim: int, n_scales: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.scale_emb = nn.Embedding(max(1, n_scales), out_dim)
        self.norm = nn.LayerNorm(out_dim)
        nn.init.normal_(self.scale_emb.weight, std=0.02)

    def forward(self, feat: Tensor, scale: Tensor) -> Tensor:
        return self.norm(self.proj(feat.float()) + self.scale_emb(scale))
