"""What drives a niche: gradient x input attribution to genes, pathways and image scales."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tissuegraph.errors import InputError
from tissuegraph.tl._core import (
    EMBED_KEY,
    NICHE_KEY,
    check_adata,
    check_int,
    require_obs,
    require_obsm,
    store_params,
)


def niche_direction(rep: np.ndarray, in_niche: np.ndarray) -> np.ndarray:
    """Unit vector from the mean embedding of the other spots to that of the niche."""
    d = rep[in_niche].mean(axis=0) - rep[~in_niche].mean(axis=0)
    n = np.linalg.norm(d)
    if not n > 0:
        raise InputError("explain: the niche's mean embedding equals that of the other spots")
    return d / n


def _graph_inputs(data):
    """Leaf tensors (float32, requires_grad) replacing the graph's differentiable inputs.

    Returns ``{name: (store, attr, tensor)}`` for the spot expression, the expression edge
    weights and every patch scale's pixels/features.
    """
    import torch

    from tissuegraph.graph import schema as S

    leaves = {}
    x = data[S.SPOT][S.X]
    leaves["spot_x"] = (data[S.SPOT], S.X, x.float().detach().clone().requires_grad_(True))
    if S.SPOT_EXPRESSES_GENE in data.edge_types:
        st = data[S.SPOT_EXPRESSES_GENE]
        if S.EDGE_WEIGHT in st:
            w = st[S.EDGE_WEIGHT].float().detach().clone().requires_grad_(True)
            leaves["expresses_w"] = (st, S.EDGE_WEIGHT, w)
    for t in S.patch_types(data):
        st = data[t]
        attr = S.IMG if S.IMG in st else (S.FEAT if S.FEAT in st else None)
        if attr is None:
            continue
        v = st[attr]
        leaf = v.float().detach().clone().requires_grad_(True)
        leaves[t] = (st, attr, leaf)
    for _name, (store, attr, leaf) in leaves.items():
        store[attr] = leaf
    return leaves, torch


_KIND_KEYS = {"fused": "fused", "expression": "expr", "image": "image"}


def differentiable_embeddings(model, data, kind: str):
    """Spot embeddings ``[N, D]`` of one full-graph forward pass, differentiable w.r.t. the
    inputs: ``model(data)[key]`` (``fused`` / ``expr`` / ``image``), or ``model.embed``."""
    if hasattr(model, "embed"):
        return model.embed(data, kind=kind)
    out = model(data)
    if isinstance(out, dict):
        z = out.get(_KIND_KEYS.get(kind, kind))
        if z is None:
            raise InputError(f"explain: the model gives no {kind!r} embedding for this graph")
        return z
    return out


def explain(
    adata,
    niche,
    *,
    checkpoint,
    graph=None,
    niche_key: str = NICHE_KEY,
    use_rep: str = EMBED_KEY,
    kind: str | None = None,
    pathways=None,
    max_spots: int = 50_000,
    device: str = "cpu",
    key_added: str | None = None,
) -> pd.DataFrame:
    """Genes, pathways and image scales that drive a niche in the model.

    The niche's direction ``d`` in embedding space is the difference between the mean
    embedding of its spots and that of the other spots (from ``obsm[use_rep]``). The score
    ``s = mean_{i in niche} <z_i, d>`` of one forward pass over the slide's graph is
    attributed to the inputs by gradient x input: per gene (spot expression and the
    spot -> gene expression edges, summed over the niche's spots), per pathway (gene
    attributions weighted by membership: ``pathways`` table, or the graph's
    ``member_of`` edges) and per image scale (summed absolute attribution of each
    ``patch_k``'s pixels).

    Parameters
    ----------
    adata
        AnnData with ``obs[niche_key]`` and ``obsm[use_rep]`` (from :func:`embed`).
    niche
        The niche label to explain.
    checkpoint
        The checkpoint the embedding came from (path or ``(model, info)``).
    graph
        The slide's graph (built from the checkpoint's config when omitted).
    kind
        Embedding kind (default: the one :func:`embed` recorded).
    pathways
        ``[source, target, weight]`` table for pathway attribution (optional).
    max_spots
        Slides larger than this are refused (one forward pass holds the whole graph).
    device
        Device of the forward pass.
    key_added
        uns key (default ``f"{niche_key}_explain"``).

    Returns
    -------
    Tidy DataFrame ``kind`` (``gene``, ``pathway``, ``scale``), ``feature``,
    ``attribution`` (signed; positive pushes spots towards the niche), ``fraction``
    (share of the absolute attribution within its kind), sorted by kind then
    ``|attribution|``; also in ``uns[key_added]`` with ``params``.
    """
    from tissuegraph.graph import schema as S
    from tissuegraph.tl._model import graph_for_adata, load_checkpoint, resolve_device
    from tissuegraph.tl._pathways import pathway_weights, read_weight_table

    func = "explain"
    check_adata(adata, func)
    labels = require_obs(adata, niche_key, func, "tissuegraph.tl.niches")
    niche = str(niche)
    cats = [str(c) for c in labels.cat.categories]
    if niche not in cats:
        raise InputError(f"{func}: niche {niche!r} not found in obs[{niche_key!r}] ({cats})")
    max_spots = check_int(max_spots, "max_spots", func)
    if adata.n_obs > max_spots:
        raise InputError(
            f"{func}: {adata.n_obs} spots > max_spots={max_spots}; explain a crop of the slide"
        )
    rep = require_obsm(
        adata, use_rep, func, "tissuegraph.tl.embed" if use_rep == EMBED_KEY else None
    )
    in_niche = (labels.astype(str) == niche).to_numpy()
    d = niche_direction(rep, in_niche)
    kind = kind or ((adata.uns.get(use_rep) or {}).get("params") or {}).get("kind", "fused")
    dev = resolve_device(device)
    model, info = load_checkpoint(checkpoint, dev, func)
    if graph is None:
        graph = graph_for_adata(adata, info)
    data = graph.clone() if hasattr(graph, "clone") else graph
    leaves, torch = _graph_inputs(data)
    data = data.to(dev)
    model.eval()
    z = differentiable_embeddings(model, data, kind)
    if z.shape[0] != adata.n_obs or z.shape[1] != d.size:
        raise InputError(
            f"{func}: obsm[{use_rep!r}] has {rep.shape[1]} dimensions but the checkpoint gives "
            f"{z.shape[1]}: embed with this checkpoint first"
        )
    idx = torch.as_tensor(np.flatnonzero(in_niche), device=z.device)
    score = (z[idx] @ torch.as_tensor(d, dtype=z.dtype, device=z.device)).mean()
    score.backward()

    genes = [str(g) for g in info["genes"]]
    g_attr = np.zeros(len(genes))
    x_leaf = leaves["spot_x"][2]
    if x_leaf.grad is not None:
        gx = (x_leaf.grad * x_leaf).detach().cpu().numpy()
        g_attr += gx[in_niche].sum(axis=0)
    if "expresses_w" in leaves and leaves["expresses_w"][2].grad is not None:
        w = leaves["expresses_w"][2]
        gw = (w.grad * w).detach().cpu().numpy()
        ei = data[S.SPOT_EXPRESSES_GENE].edge_index.cpu().numpy()
        keep = in_niche[ei[0]]
        np.add.at(g_attr, ei[1][keep], gw[keep])
    g_attr /= max(int(in_niche.sum()), 1)

    rows = [("gene", g, float(v)) for g, v in zip(genes, g_attr)]
    # pathways
    if pathways is not None:
        table = read_weight_table(pathways, func)
        wmat, pnames, _ = pathway_weights(table, genes, min_size=1)
    elif S.GENE_MEMBER_OF_PATHWAY in data.edge_types:
        pnames = [
            str(p) for p in (info.get("pathways") or getattr(data, "meta", {}).get("pathways", []))
        ]
        st = data[S.GENE_MEMBER_OF_PATHWAY]
        ei = st.edge_index.cpu().numpy()
        ww = (
            st[S.EDGE_WEIGHT].detach().cpu().numpy()
            if S.EDGE_WEIGHT in st
            else np.ones(ei.shape[1])
        )
        wmat = np.zeros((len(genes), max(len(pnames), int(ei[1].max()) + 1 if ei.size else 0)))
        wmat[ei[0], ei[1]] = ww
        pnames = pnames + [f"pathway_{i}" for i in range(len(pnames), wmat.shape[1])]
    else:
        wmat, pnames = np.zeros((len(genes), 0)), []
    if len(pnames):
        aw = np.abs(wmat)
        p_attr = (g_attr[:, None] * aw).sum(axis=0) / np.maximum(aw.sum(axis=0), 1e-12)
        rows += [("pathway", p, float(v)) for p, v in zip(pnames, p_attr)]
    # image scales
    sizes = (getattr(data, "meta", None) or {}).get("patch_sizes_um", [])
    for t in S.patch_types(data):
        if t not in leaves or leaves[t][2].grad is None:
            continue
        leaf = leaves[t][2]
        a = float((leaf.grad * leaf).abs().sum().item())
        k = S.patch_level(t)
        name = f"{t} ({sizes[k]:g} µm)" if k < len(sizes) else t
        rows.append(("scale", name, a))

    out = pd.DataFrame(rows, columns=["kind", "feature", "attribution"])
    tot = out.groupby("kind")["attribution"].transform(lambda s: s.abs().sum())
    out["fraction"] = out["attribution"].abs() / tot.replace(0, np.nan)
    out["_abs"] = out["attribution"].abs()
    order = {"gene": 0, "pathway": 1, "scale": 2}
    out["_k"] = out["kind"].map(order)
    out = out.sort_values(["_k", "_abs"], ascending=[True, False]).drop(columns=["_abs", "_k"])
    out = out.reset_index(drop=True)
    store_params(
        adata,
        key_added or f"{niche_key}_explain",
        {"niche": niche, "niche_key": niche_key, "use_rep": use_rep, "kind": kind},
        results=out,
        score=float(score.item()),
    )
    return out
