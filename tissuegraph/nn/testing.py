"""A tiny, fully synthetic graph that follows :mod:`tissuegraph.graph.schema` (for tests,
examples and smoke runs; like PyG's ``FakeDataset``).

The slide is a square lattice of spots over a smooth random "tissue" field. The field drives
both the spots' expression and an RGB image from which the multi-scale patches are cropped,
so image <-> expression and patch <-> region relations are learnable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import HeteroData

from tissuegraph.graph import schema as S

__all__ = ["tiny_graph", "write_graph_dir"]


def _smooth_field(rng, h, w, n_channels, n_blobs=12):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((n_channels, h, w), np.float32)
    for c in range(n_channels):
        for _ in range(n_blobs):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            s = rng.uniform(0.08, 0.25) * max(h, w)
            out[c] += rng.normal() * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return out


def _crop(image, um_per_px, centers, size_um, out_px):
    """Nearest-neighbour crops ``[M, 3, out_px, out_px]`` (zero outside the image)."""
    c, h, w = image.shape
    offs = (np.arange(out_px) + 0.5) / out_px - 0.5
    out = np.zeros((len(centers), c, out_px, out_px), np.uint8)
    for i, (x, y) in enumerate(centers):
        cols = np.floor((x + offs * size_um) / um_per_px).astype(int)
        rows = np.floor((y + offs * size_um) / um_per_px).astype(int)
        okc, okr = (cols >= 0) & (cols < w), (rows >= 0) & (rows < h)
        sub = image[:, np.clip(rows, 0, h - 1)][:, :, np.clip(cols, 0, w - 1)]
        sub = sub * okr[None, :, None] * okc[None, None, :]
        out[i] = sub
    return out


def tiny_graph(
    n_side: int = 12,
    n_genes: int = 24,
    n_pathways: int = 3,
    n_scales: int = 3,
    crop_px: int = 16,
    *,
    spacing_um: float = 100.0,
    feat_dim: int | None = None,
    expresses_top_k: int = 8,
    seed: int = 0,
    slide_index: int = 0,
    slide_name: str | None = None,
) -> HeteroData:
    """A small ``HeteroData`` with every node and edge type of the schema.

    Parameters
    ----------
    n_side
        Spots per side of the square lattice (``n_side**2`` spots).
    n_genes, n_pathways
        Panel size and number of pathway nodes (0: no pathway nodes).
    n_scales
        Patch scales (``patch_0`` 110 µm, then 3x larger each); 0: no patches.
    crop_px
        Side of the uint8 crops (``img``); with ``feat_dim`` set, random ``feat`` instead.
    seed
        Everything is deterministic given the seed.
    """
    rng = np.random.default_rng(seed)
    n = n_side * n_side
    gx, gy = np.meshgrid(np.arange(n_side), np.arange(n_side))
    pos = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float64) * spacing_um + spacing_um
    extent = (n_side + 1) * spacing_um
    um_per_px = spacing_um / 8.0
    hw = int(np.ceil(extent / um_per_px)) + 1
    field = _smooth_field(rng, hw, hw, 4)
    # expression: genes load on 4 latent channels of the field at the spot
    cols = np.clip((pos[:, 0] / um_per_px).astype(int), 0, hw - 1)
    rows = np.clip((pos[:, 1] / um_per_px).astype(int), 0, hw - 1)
    z = field[:, rows, cols].T  # [n, 4]
    load = rng.normal(size=(4, n_genes))
    rate = np.exp(0.8 * (z @ load) / 2 + rng.normal(0, 0.2, size=(n, n_genes)))
    counts = rng.poisson(rate * 3)
    x = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 100).astype(np.float16)

    data = HeteroData()
    data[S.SPOT][S.X] = torch.from_numpy(x)
    data[S.SPOT][S.POS] = torch.from_numpy(pos.astype(np.float32))
    data[S.SPOT][S.SLIDE] = torch.full((n,), slide_index, dtype=torch.long)

    # spot graph: 8-neighbourhood on the lattice
    src, dst = [], []
    idx = np.arange(n).reshape(n_side, n_side)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dx == dy == 0:
                continue
            a = idx[max(0, -dy) : n_side - max(0, dy), max(0, -dx) : n_side - max(0, dx)]
            b = idx[max(0, dy) : n_side - max(0, -dy), max(0, dx) : n_side - max(0, -dx)]
            src.append(a.ravel())
            dst.append(b.ravel())
    src, dst = np.concatenate(src), np.concatenate(dst)
    d = np.linalg.norm(pos[src] - pos[dst], axis=1)
    data[S.SPOT_NEAR_SPOT].edge_index = torch.from_numpy(np.stack([src, dst])).long()
    data[S.SPOT_NEAR_SPOT][S.EDGE_ATTR] = torch.from_numpy(d.astype(np.float32))[:, None]

    # genes, expresses (top-k per spot)
    data[S.GENE][S.INDEX] = torch.arange(n_genes)
    data[S.GENE].num_nodes = n_genes
    k = min(expresses_top_k, n_genes)
    top = np.argsort(-x.astype(np.float32), axis=1)[:, :k]
    es = np.repeat(np.arange(n), k)
    eg = top.ravel()
    ew = x[es, eg].astype(np.float32)
    data[S.SPOT_EXPRESSES_GENE].edge_index = torch.from_numpy(np.stack([es, eg])).long()
    data[S.SPOT_EXPRESSES_GENE][S.EDGE_WEIGHT] = torch.from_numpy(ew)
    data[S.GENE_REV_EXPRESSES_SPOT].edge_index = torch.from_numpy(np.stack([eg, es])).long()
    data[S.GENE_REV_EXPRESSES_SPOT][S.EDGE_WEIGHT] = torch.from_numpy(ew)
    # priors
    m = 3 * n_genes
    r = rng.integers(0, n_genes, size=(2, m))
    r = r[:, r[0] != r[1]]
    data[S.GENE_REGULATES_GENE].edge_index = torch.from_numpy(r).long()
    data[S.GENE_REGULATES_GENE][S.EDGE_WEIGHT] = torch.from_numpy(
        rng.choice([-1.0, 1.0], size=r.shape[1]).astype(np.float32)
    )
    lr = rng.integers(0, n_genes, size=(2, n_genes // 2))
    data[S.GENE_BINDS_GENE].edge_index = torch.from_numpy(lr).long()
    pathways = [f"PW{i}" for i in range(n_pathways)]
    if n_pathways:
        data[S.PATHWAY][S.INDEX] = torch.arange(n_pathways)
        data[S.PATHWAY].num_nodes = n_pathways
        g = np.arange(n_genes)
        p = rng.integers(0, n_pathways, size=n_genes)
        w = rng.uniform(0.5, 3.0, size=n_genes).astype(np.float32)
        data[S.GENE_MEMBER_OF_PATHWAY].edge_index = torch.from_numpy(np.stack([g, p])).long()
        data[S.GENE_MEMBER_OF_PATHWAY][S.EDGE_WEIGHT] = torch.from_numpy(w)
        data[S.PATHWAY_REV_MEMBER_OF_GENE].edge_index = torch.from_numpy(np.stack([p, g])).long()
        data[S.PATHWAY_REV_MEMBER_OF_GENE][S.EDGE_WEIGHT] = torch.from_numpy(w)

    # patches
    sizes = [110.0 * 3**k for k in range(n_scales)]
    img = np.clip(128 + 60 * np.tanh(field[:3]), 0, 255).astype(np.uint8)
    level_pos = [pos]
    for lev in range(n_scales):
        if lev > 0:
            # parents of level lev-1 on a lattice of side sizes[lev] anchored at 0
            cell = np.floor(level_pos[lev - 1] / sizes[lev]).astype(np.int64)
            uniq, inv = np.unique(cell, axis=0, return_inverse=True)
            inv = inv.ravel()
            ppos = (uniq + 0.5) * sizes[lev]
            child = level_pos[lev - 1]
            sub = np.clip(np.floor((child - (ppos[inv] - sizes[lev] / 2)) / (sizes[lev] / 3)), 0, 2)
            loc = (3 * sub[:, 1] + sub[:, 0]).astype(np.int64)
            et = S.patch_in_parent(lev - 1)
            ei = np.stack([np.arange(len(child)), inv])
            data[et].edge_index = torch.from_numpy(ei).long()
            data[et][S.LOC] = torch.from_numpy(loc)
            data[S.parent_rev_in_patch(lev - 1)].edge_index = torch.from_numpy(
                ei[::-1].copy()
            ).long()
            level_pos.append(ppos)
        t = S.patch(lev)
        p = level_pos[lev]
        if feat_dim:
            data[t][S.FEAT] = torch.from_numpy(
                rng.normal(size=(len(p), feat_dim)).astype(np.float16)
            )
        else:
            data[t][S.IMG] = torch.from_numpy(_crop(img, um_per_px, p, sizes[lev], crop_px))
        data[t][S.POS] = torch.from_numpy(p.astype(np.float32))
        data[t][S.SIZE_UM] = torch.tensor([sizes[lev]], dtype=torch.float32)
    if n_scales:
        ar = torch.arange(n)
        data[S.PATCH0_OF_SPOT].edge_index = torch.stack([ar, ar])
        data[S.SPOT_REV_OF_PATCH0].edge_index = torch.stack([ar, ar])

    data.meta = {
        "schema_version": S.SCHEMA_VERSION,
        "slide": slide_name or f"tiny{slide_index}",
        "slide_index": slide_index,
        "barcodes": [f"s{i}" for i in range(n)],
        "genes": [f"G{i}" for i in range(n_genes)],
        "gene_ids": [f"G{i}" for i in range(n_genes)],
        "pathways": pathways,
        "patch_sizes_um": sizes,
        "crop_px": crop_px,
        "config_hash": "tiny",
        "units": "um",
        "image": None,
        "prior_coverage": {},
    }
    return data


def write_graph_dir(
    graphs: list[HeteroData],
    out_dir: str | os.PathLike,
    *,
    standardize: bool = False,
    n_pcs: int = 0,
    fit_slides: list[str] | None = None,
) -> Path:
    """Save ``graphs`` and a ``manifest.json`` like ``tissuegraph build-graphs`` does.

    ``standardize``: also fit the standardisation statistics (and ``n_pcs`` components) on
    ``fit_slides`` (default: all) into ``manifest["standardize"]``."""
    from tissuegraph.graph.storage import save_graph

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slides = []
    for g in graphs:
        name = g.meta["slide"]
        save_graph(g, out / f"{name}{S.GRAPH_SUFFIX}")
        slides.append(
            {
                "name": name,
                "file": f"{name}{S.GRAPH_SUFFIX}",
                "n_spots": int(g[S.SPOT].num_nodes),
                "config_hash": "tiny",
                "node_counts": {t: int(g[t].num_nodes) for t in g.node_types},
                "edge_counts": {"__".join(e): int(g[e].num_edges) for e in g.edge_types},
                "prior_coverage": {},
            }
        )
    g0 = graphs[0]
    manifest = {
        "schema_version": S.SCHEMA_VERSION,
        "tissuegraph_version": "0.1.0",
        "versions": {},
        "config_hash": "tiny",
        "build_config": {"synthetic": True, "patches": {"crop_px": g0.meta["crop_px"]}},
        "genes": list(g0.meta["genes"]),
        "gene_ids": list(g0.meta["gene_ids"]),
        "pathways": list(g0.meta["pathways"]),
        "slides": slides,
    }
    if standardize:
        from tissuegraph.graph.standardize import fit_standardization

        names = fit_slides or [g.meta["slide"] for g in graphs]
        xs = [g[S.SPOT][S.X] for g in graphs if g.meta["slide"] in names]
        manifest["standardize"] = fit_standardization(xs, n_pcs=n_pcs, names=names)
    (out / S.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out
