"""Self-supervised objectives (after STAMP / CLIP, generalised to graphs).

- ``contrastive``: symmetric InfoNCE between a spot's expression-side embedding and its
  ``patch_0`` image-side embedding after message passing, learnable temperature, in-batch
  negatives. A tile is a window of one slide, so every negative is a nearby spot of the same
  slide: hard negatives come for free. With ``middle`` fusion the anchors' own ``patch_0 <->
  spot`` edges are removed in the training pass, otherwise the two embeddings would carry each
  other's input and the task would be solved by copying.
- ``patch_region``: InfoNCE of ``patch_k`` against the parents ``patch_k+1`` in the tile, on the
  image-encoder outputs (before message passing: after it, a child has already received its
  parent's message through the ``in`` edge, which makes the task trivial).
- ``localisation``: 9-way cross-entropy of the child's cell in the parent's 3x3 grid from the
  concatenated child and parent embeddings after message passing (positions are never inputs).
- ``masked_expression``: a fraction of the tile's spots get their expression hidden (input zeroed
  / replaced by the mask token, and their ``expresses`` edges in both directions dropped) and the
  decoder reconstructs it from the fused embedding (neighbours + image). MSE on the normalised
  (log1p) values the graph stores: raw counts are optional in the schema, and the same target
  is what image -> expression prediction reports.
- ``local_global``: a DGI-style local-global contrast for spatial domains. The negative is the
  same tile with its spots' expression shuffled (rows permuted, ``expresses`` edges moved
  along, graph and image kept); the summary of spot ``i`` is the sigmoid of the mean
  embedding of its spot-graph neighbours; a bilinear discriminator scores embedding against
  summary, both ways (real embedding vs real summary, corrupted vs corrupted summary), with
  binary cross-entropy over the tile's core spots.
- ``masked_feature``: GraphMAE-style. Hidden spots enter with the mask token; their embeddings
  are re-masked (set to zero) and a one-layer neighbour decoder reconstructs their
  standardised input ``z`` (per-gene scaled, PCA basis when fitted), scored with the scaled
  cosine error ``(1 - cos)^gamma``.
- ``reconstruction``: MSE of the standardised input ``z`` of the visible core spots decoded
  linearly from their embedding (keeps what the input had in the embedding).
- ``image_expression``: the image -> expression task itself. A second pass over the tile
  with the expression of *every* spot hidden (the core spots and their neighbours in the
  halo: input replaced by the mask token, ``expresses`` edges dropped), so the decoder must
  predict each core spot's normalised expression from image nodes alone: its ``patch_0``,
  the neighbours' ``patch_0`` through the spot graph and the region context of ``patch_1`` /
  ``patch_2``. MSE as ``masked_expression``; this is what ``tl.predict_expression(...,
  method="decoder")`` runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import HeteroData

from tissuegraph.graph import schema as S

__all__ = ["TERMS", "info_nce", "apply_masks", "hide_all_expression", "Objectives"]

TERMS = (
    "contrastive",
    "patch_region",
    "localisation",
    "masked_expression",
    "local_global",
    "masked_feature",
    "reconstruction",
    "image_expression",
)
EXPRESSION_TERMS = ("masked_expression", "local_global", "masked_feature", "reconstruction")
MASKING_TERMS = ("masked_expression", "masked_feature")


def info_nce(a: Tensor, b: Tensor, logit_scale: Tensor, symmetric: bool = True) -> Tensor:
    """InfoNCE of row-aligned pairs ``a[i] <-> b[i]`` (``[B, D]`` each) with in-batch negatives."""
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    logits = logit_scale.exp() * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss


def apply_masks(
    tile: HeteroData,
    *,
    mask_ratio: float,
    anchor_fraction: float,
    generator: torch.Generator,
    cut_identity: bool = True,
) -> HeteroData:
    """Choose hidden-expression spots and contrastive anchors among the tile's core spots.

    Sets ``spot.x_mask`` (bool), ``spot.anchor`` (bool) and ``spot.x_target`` (the original
    expression of hidden spots); zeroes hidden spots' ``x`` and drops their expresses edges
    (both directions); with ``cut_identity`` drops the anchors' ``patch_0 <-> spot`` edges.
    """
    spot = tile[S.SPOT]
    n = spot[S.X].shape[0]
    dev = spot[S.X].device
    core = spot["core"].nonzero().view(-1)
    perm = core[torch.randperm(core.numel(), generator=generator).to(dev)]
    n_mask = int(round(mask_ratio * core.numel()))
    n_anchor = min(int(round(anchor_fraction * core.numel())), core.numel() - n_mask)
    x_mask = torch.zeros(n, dtype=torch.bool, device=dev)
    anchor = torch.zeros(n, dtype=torch.bool, device=dev)
    x_mask[perm[:n_mask]] = True
    anchor[perm[n_mask : n_mask + n_anchor]] = True
    x = spot[S.X]
    spot["x_target"] = x[x_mask].float()
    if n_mask:  # only then copy the (possibly wide, float16) expression
        x = x.to(torch.float32, copy=True)
        x[x_mask] = 0.0
    spot[S.X] = x
    spot["x_mask"] = x_mask
    spot["anchor"] = anchor
    drops = []
    if n_mask:
        drops += [(S.SPOT_EXPRESSES_GENE, 0, x_mask), (S.GENE_REV_EXPRESSES_SPOT, 1, x_mask)]
    if cut_identity and n_anchor:
        drops += [(S.PATCH0_OF_SPOT, 1, anchor), (S.SPOT_REV_OF_PATCH0, 0, anchor)]
    for et, side, m in drops:
        if et not in tile.edge_types:
            continue
        st = tile[et]
        keep = ~m[st.edge_index[side]]
        for key in list(st.keys()):
            v = st[key]
            if key == "edge_index":
                st[key] = v[:, keep]
            elif torch.is_tensor(v) and v.shape[:1] == keep.shape:
                st[key] = v[keep]
    return tile


def hide_all_expression(tile: HeteroData) -> HeteroData:
    """A copy of ``tile`` in which no spot shows its expression (image-only input).

    Every spot (core and halo) gets ``x_mask`` True and ``x`` zero, and the ``expresses``
    edges are dropped in both directions; patches and their edges are kept. Masks set earlier
    by :func:`apply_masks` are undone first: ``spot.x_full`` holds the original expression.
    """
    out = tile.clone()
    spot = out[S.SPOT]
    x = spot[S.X]
    if "x_mask" in spot and "x_target" in spot and bool(spot["x_mask"].any()):
        x = x.to(torch.float32, copy=True)
        x[spot["x_mask"]] = spot["x_target"].to(x.dtype)
    spot["x_full"] = x
    spot[S.X] = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    spot["x_mask"] = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    spot["x_target"] = x.float()
    for key in (S.Z, "anchor"):
        if key in spot:
            del spot[key]
    for et in (S.SPOT_EXPRESSES_GENE, S.GENE_REV_EXPRESSES_SPOT):
        if et in out.edge_types:
            del out[et]
    return out


class Objectives(nn.Module):
    """The weighted pretraining loss around a model (this is what DDP wraps).

    ``forward(tile)`` returns ``{"loss": total, term: value, ...}`` with one entry per term of
    non-zero weight (unweighted values; ``loss`` is the weighted sum), plus ``temperature``.
    """

    def __init__(self, model: nn.Module, cfg):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.weights = {t: float(getattr(cfg, t)) for t in TERMS}

    def active(self) -> list[str]:
        m = self.model
        has_img = getattr(m, "image_encoder", None) is not None
        out = []
        for t in TERMS:
            if self.weights[t] <= 0:
                continue
            if t not in EXPRESSION_TERMS and not has_img:
                continue
            if t in ("patch_region", "localisation") and m.n_scales < 2:
                continue
            out.append(t)
        return out

    def forward(self, tile: HeteroData) -> dict[str, Tensor]:
        m = self.model
        keep = m.spot_edge_keep(tile) if hasattr(m, "spot_edge_keep") else None
        out = m(tile, edge_keep=keep) if keep is not None else m(tile)
        out["edge_keep"] = keep
        active = self.active()
        spot = tile[S.SPOT]
        losses: dict[str, Tensor] = {}
        cfg = self.cfg
        tmin = float(cfg.temperature_min)
        lmax = math.log(1.0 / tmin)
        for term in active:
            if term == "contrastive":
                a = spot["anchor"] if "anchor" in spot else spot["core"]
                if int(a.sum()) < 2 or out["image"] is None:
                    continue
                za = m.proj_expr(out["expr"][a])
                zb = m.proj_image(out["image"][a])
                losses[term] = info_nce(za, zb, m.logit_scale.clamp(max=lmax))
            elif term == "patch_region":
                parts = []
                for k in range(m.n_scales - 1):
                    et = S.patch_in_parent(k)
                    if et not in tile.edge_types:
                        continue
                    ei = tile[et].edge_index
                    if ei.shape[1] == 0:
                        continue
                    ei = ei[:, : int(cfg.max_region_pairs)]
                    parents, inv = torch.unique(ei[1], return_inverse=True)
                    if parents.numel() < 2:
                        continue
                    zc = F.normalize(m.proj_child(out["enc"][S.patch(k)][ei[0]]).float(), dim=-1)
                    zp = F.normalize(
                        m.proj_parent(out["enc"][S.patch(k + 1)][parents]).float(), dim=-1
                    )
                    logits = m.logit_scale_region.clamp(max=lmax).exp() * zc @ zp.T
                    parts.append(F.cross_entropy(logits, inv))
                if parts:
                    losses[term] = torch.stack(parts).mean()
            elif term == "localisation":
                logits, target = [], []
                for k in range(m.n_scales - 1):
                    et = S.patch_in_parent(k)
                    if et not in tile.edge_types or tile[et].edge_index.shape[1] == 0:
                        continue
                    ei = tile[et].edge_index[:, : int(cfg.max_loc_pairs)]
                    loc = tile[et][S.LOC][: ei.shape[1]]
                    logits.append(m.localisation_logits(tile, out, k, ei).float())
                    target.append(loc)
                if logits:
                    losses[term] = F.cross_entropy(torch.cat(logits), torch.cat(target))
            elif term == "masked_expression":
                if "x_mask" not in spot or not bool(spot["x_mask"].any()):
                    continue
                pred = m.predict_expression(out["fused"][spot["x_mask"]]).float()
                losses[term] = F.mse_loss(pred, spot["x_target"].float())
            elif term == "local_global":
                v = local_global_loss(m, tile, out, hops=int(cfg.local_global_hops))
                if v is not None:
                    losses[term] = v
            elif term == "masked_feature":
                v = masked_feature_loss(m, tile, out, float(cfg.mae_gamma))
                if v is not None:
                    losses[term] = v
            elif term == "reconstruction":
                keep = spot["core"]
                if "x_mask" in spot:
                    keep = keep & ~spot["x_mask"]
                if bool(keep.any()):
                    z = _standardized(m, spot, keep)
                    losses[term] = F.mse_loss(m.recon_head(out["fused"][keep]).float(), z)
            elif term == "image_expression":
                core = spot["core"]
                if not bool(core.any()):
                    continue
                img_tile = hide_all_expression(tile)
                fused = m(img_tile)["fused"][core]
                target = img_tile[S.SPOT]["x_full"][core].float()
                losses[term] = F.mse_loss(m.predict_expression(fused).float(), target)
        dev = out["fused"].device
        total = torch.zeros((), device=dev)
        for t, v in losses.items():
            total = total + self.weights[t] * v
        losses["loss"] = total
        losses["temperature"] = m.temperature(False, tmin).detach()
        # keep every parameter in the graph (DDP: tiles without a term still sync)
        return losses


def _standardized(m: nn.Module, spot, rows: Tensor) -> Tensor:
    """The standardised input ``z`` of the visible spots ``rows`` (precomputed when present)."""
    if S.Z in spot:
        return spot[S.Z][rows].float()
    return m.expr_encoder.standardized(spot[S.X][rows])


def _neighbour_mean(h: Tensor, edge_index: Tensor, hops: int = 1) -> Tensor:
    """The mean over each node's in-neighbours, applied ``hops`` times (degrees computed once)."""
    src, dst = edge_index
    deg = torch.bincount(dst, minlength=h.shape[0]).clamp_min(1).to(h.dtype)[:, None]
    for _ in range(hops):
        h = torch.zeros_like(h).index_add_(0, dst, h.index_select(0, src)) / deg
    return h


def local_global_loss(m: nn.Module, tile: HeteroData, out: dict, hops: int = 1) -> Tensor | None:
    """DGI-style contrast of each core spot's embedding with its neighbourhood summary.

    ``s_i = sigmoid(mean_{j in N(i)} h_j)`` (``hops`` > 1: the neighbour mean applied that
    many times, a wider neighbourhood); positives ``D(h_i, s_i)`` and ``D(h~_i, s~_i)``,
    negatives ``D(h~_i, s_i)`` and ``D(h_i, s~_i)``, with ``h~`` the embeddings of the tile
    whose expression rows are shuffled and ``D`` a bilinear discriminator.
    """
    if S.SPOT_NEAR_SPOT not in tile.edge_types:
        return None
    ei = tile[S.SPOT_NEAR_SPOT].edge_index
    core = tile[S.SPOT]["core"]
    n = core.shape[0]
    if ei.shape[1] == 0 or n < 2:
        return None
    perm = torch.randperm(n).to(ei.device)  # the global CPU RNG: checkpointed, exact on resume
    h = out["fused"].float()
    h_neg = m(tile, perm=perm, enc=out["enc"], edge_keep=out.get("edge_keep"))["fused"].float()
    # real and corrupted embeddings side by side: one gather / scatter per hop
    s_pos, s_neg = torch.sigmoid(_neighbour_mean(torch.cat([h, h_neg], 1), ei, hops)).chunk(2, 1)
    d = m.discriminator
    pos = torch.cat([d(h, s_pos), d(h_neg, s_neg)]).view(-1)
    neg = torch.cat([d(h_neg, s_pos), d(h, s_neg)]).view(-1)
    sel = torch.cat([core, core])
    logits = torch.cat([pos[sel], neg[sel]]).float()
    target = torch.cat([torch.ones_like(pos[sel]), torch.zeros_like(neg[sel])]).float()
    return F.binary_cross_entropy_with_logits(logits, target)


def masked_feature_loss(m: nn.Module, tile: HeteroData, out: dict, gamma: float) -> Tensor | None:
    """GraphMAE-style scaled cosine error on the hidden spots' standardised input."""
    spot = tile[S.SPOT]
    if "x_mask" not in spot or not bool(spot["x_mask"].any()):
        return None
    mask = spot["x_mask"]
    h = out["fused"].masked_fill(mask[:, None], 0.0)  # re-mask before decoding
    ei = (
        tile[S.SPOT_NEAR_SPOT].edge_index
        if S.SPOT_NEAR_SPOT in tile.edge_types
        else torch.zeros(2, 0, dtype=torch.long, device=h.device)
    )
    rec = m.feature_decoder(h, ei)[mask].float()
    if S.Z in spot:
        target = spot[S.Z][mask].float()
    else:
        target = m.expr_encoder.standardized(spot["x_target"]).float()
    cos = F.cosine_similarity(rec, target, dim=-1)
    return (1.0 - cos).clamp_min(0).pow(gamma).mean()
