"""Inference over whole slide graphs in spatial tiles (numpy out, in spot order)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch_geometric.data import HeteroData

from tissuegraph._utils import resolve_device
from tissuegraph.graph import schema as S
from tissuegraph.nn.model import check_data_spec, data_spec, unwrap
from tissuegraph.train.objectives import apply_masks, hide_all_expression
from tissuegraph.train.sampler import SlideIndex, _tile_side, grid_tiles

__all__ = ["embed_graph", "predict_graph", "image_only_embedding"]

KINDS = ("fused", "expression", "image")


def _tiles(index: SlideIndex, batch_spots: int):
    if index.n <= batch_spots:  # the whole slide at once
        return [np.arange(index.n)]
    side = _tile_side(index.pos, batch_spots)
    return grid_tiles(index.pos, side)


def _prepare(model, data: HeteroData):
    m = unwrap(model)
    check_data_spec(m.data_spec, data_spec(data))
    return m, SlideIndex(_fill_missing_genes(m, data))


def _fill_missing_genes(m, data: HeteroData) -> HeteroData:
    """Panel genes the slide does not measure (``meta['missing_genes']``, stored as zero
    columns) get the training mean, i.e. a standardised value of 0 ("unknown"), instead of a
    zero count that the standardisation would turn into a strong, false signal."""
    meta = getattr(data, "meta", None) or {}
    missing, genes = meta.get("missing_genes") or [], meta.get("genes") or []
    enc = m.expr_encoder
    if not missing or not genes or not enc.standardize:
        return data
    pos = {g: i for i, g in enumerate(genes)}
    idx = torch.tensor([pos[g] for g in missing if g in pos], dtype=torch.long)
    if idx.numel() == 0:
        return data
    x = data[S.SPOT][S.X]
    x = (x.to_dense() if x.is_sparse else x).clone()
    x[:, idx] = enc.std_mean[idx].to(x.dtype).cpu()
    out = data.clone()
    out[S.SPOT][S.X] = x
    return out


@torch.no_grad()
def embed_graph(
    model,
    data: HeteroData,
    *,
    kind: str = "fused",
    batch_spots: int = 8192,
    device="auto",
) -> np.ndarray:
    """Spot embeddings of a whole slide graph, computed in spatial tiles with a full halo
    (``n_layers + 1`` hops; a slide of at most ``batch_spots`` spots is one tile).

    Parameters
    ----------
    model
        A pretrained model (:func:`tissuegraph.train.checkpoint.load_model`).
    data
        A slide graph built with the checkpoint's build config and panel.
    kind
        ``fused`` (what analysis uses), ``expression`` or ``image`` (the modality-specific
        embeddings; for ``middle`` fusion computed with each spot's own ``patch_0 <-> spot``
        edges removed, as in training).
    batch_spots
        Spots per tile (before the halo).

    Returns
    -------
    ``float32 [N_spots, hidden_dim]`` in the graph's spot order.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    m, index = _prepare(model, data)
    dev = resolve_device(device)
    m.to(dev).eval()
    out = np.zeros((index.n, m.dim), np.float32)
    from tissuegraph.train.sampler import extract_tile

    g = torch.Generator().manual_seed(0)
    for core in _tiles(index, batch_spots):
        # one hop more than the layers: the degree normalisation of the outer ring is exact
        tile = extract_tile(index, torch.from_numpy(core), m.n_layers + 1)
        if kind != "fused":
            tile = apply_masks(
                tile,
                mask_ratio=0.0,
                anchor_fraction=1.0,
                generator=g,
                cut_identity=m.fusion == "middle",
            )
        res = m(tile.to(dev))
        key = {"fused": "fused", "expression": "expr", "image": "image"}[kind]
        if res[key] is None:
            raise ValueError(f"kind={kind!r}: the model has no image input")
        c = tile[S.SPOT]["core"]
        out[tile[S.SPOT]["n_id"][c.cpu()].numpy()] = res[key][c].float().cpu().numpy()
    return out


def _image_only(m, index: SlideIndex, batch_spots: int, dev, decode: bool) -> np.ndarray:
    """Fused embeddings (or their decoded expression) of every spot with the expression of
    all spots hidden, tile by tile (halo of ``n_layers`` hops)."""
    from tissuegraph.train.sampler import extract_tile

    width = m.n_genes if decode else m.dim
    out = np.zeros((index.n, width), np.float32)
    for core in _tiles(index, batch_spots):
        tile = hide_all_expression(extract_tile(index, torch.from_numpy(core), m.n_layers))
        res = m(tile.to(dev))
        c = tile[S.SPOT]["core"]
        h = res["fused"][c]
        if decode:
            h = m.predict_expression(h)
        out[tile[S.SPOT]["n_id"][c.cpu()].numpy()] = h.float().cpu().numpy()
    return out


@torch.no_grad()
def image_only_embedding(model, data: HeteroData, *, batch_spots: int = 8192, device="auto"):
    """``float32 [N_spots, hidden_dim]``: the fused embedding of every spot computed with the
    expression of all spots hidden (what the image-only decoder reads)."""
    m, index = _prepare(model, data)
    dev = resolve_device(device)
    m.to(dev).eval()
    return _image_only(m, index, batch_spots, dev, decode=False)


@torch.no_grad()
def predict_graph(
    model,
    data: HeteroData,
    *,
    batch_spots: int = 8192,
    device="auto",
    mask_ratio: float = 0.25,
    image_only: bool = False,
) -> np.ndarray:
    """Expression predicted for every spot with its own expression hidden.

    The core spots of each tile are split into ``ceil(1 / mask_ratio)`` groups; each pass
    hides one group (input zeroed, expresses edges dropped) and decodes it from the image and
    the neighbours, as in masked-expression training. With ``image_only`` the expression of
    every spot is hidden in one pass (the ``image_expression`` objective's setting): the
    prediction comes from the image nodes alone.

    Returns
    -------
    ``float32 [N_spots, G]``: normalised expression in the panel's gene order.
    """
    from tissuegraph.train.sampler import extract_tile

    m, index = _prepare(model, data)
    dev = resolve_device(device)
    m.to(dev).eval()
    if image_only:
        return _image_only(m, index, batch_spots, dev, decode=True)
    out = np.zeros((index.n, m.n_genes), np.float32)
    n_groups = max(1, math.ceil(1.0 / max(mask_ratio, 1e-6)))
    for core in _tiles(index, batch_spots):
        base = extract_tile(index, torch.from_numpy(core), m.n_layers)
        cidx = base[S.SPOT]["core"].nonzero().view(-1)
        perm = cidx[torch.randperm(cidx.numel(), generator=torch.Generator().manual_seed(0))]
        for grp in range(n_groups):
            chosen = perm[grp::n_groups]
            if chosen.numel() == 0:
                continue
            tile = base.clone()
            tile[S.SPOT]["core"] = torch.zeros_like(base[S.SPOT]["core"])
            tile[S.SPOT]["core"][chosen] = True
            tile = apply_masks(
                tile,
                mask_ratio=1.0 - 1e-9,
                anchor_fraction=0.0,
                generator=torch.Generator().manual_seed(grp),
                cut_identity=False,
            )
            res = m(tile.to(dev))
            sel = tile[S.SPOT]["x_mask"]
            pred = m.predict_expression(res["fused"][sel]).float().cpu().numpy()
            out[tile[S.SPOT]["n_id"][sel.cpu()].numpy()] = pred
    return out
