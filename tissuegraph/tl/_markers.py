"""Marker genes of niches (scanpy's rank_genes_groups on log-normalised expression)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tissuegraph.errors import InputError
from tissuegraph.tl._core import (
    NICHE_KEY,
    check_adata,
    check_choice,
    check_int,
    log_normalized,
    require_obs,
    store_params,
)


def niche_markers(
    adata,
    *,
    niche_key: str = NICHE_KEY,
    n_genes: int = 25,
    method: str = "wilcoxon",
    layer: str | None = None,
    key_added: str | None = None,
) -> pd.DataFrame:
    """Genes that distinguish each niche from all other spots.

    Runs ``scanpy.tl.rank_genes_groups`` (one niche vs rest) on a library-size normalised,
    ``log1p`` copy of the expression (``adata.X`` or ``layer``; raw counts are normalised,
    a non-integer matrix is used as is). ``adata.X`` is never modified.

    Parameters
    ----------
    adata
        AnnData with expression and ``obs[niche_key]``.
    niche_key
        obs column of the niche labels.
    n_genes
        Top genes kept per niche.
    method
        ``"wilcoxon"``, ``"t-test"``, ``"t-test_overestim_var"`` or ``"logreg"``.
    layer
        Layer holding expression instead of ``X``.
    key_added
        uns key (default ``f"{niche_key}_markers"``).

    Returns
    -------
    Tidy DataFrame with columns ``niche``, ``gene``, ``logfc``, ``pval``, ``padj``,
    ``score`` (``n_genes`` rows per niche, best first), also written to
    ``uns[key_added]`` (``{"markers": DataFrame, "params"}``).
    """
    import scanpy as sc
    from anndata import AnnData

    func = "niche_markers"
    check_adata(adata, func)
    labels = require_obs(adata, niche_key, func, "tissuegraph.tl.niches")
    n_genes = check_int(n_genes, "n_genes", func)
    check_choice(method, "method", ("wilcoxon", "t-test", "t-test_overestim_var", "logreg"), func)
    if layer is not None and layer not in adata.layers:
        raise InputError(f"{func}: layers[{layer!r}] not found")
    if adata.n_vars == 0:
        raise InputError(f"{func}: the AnnData has no genes")
    keep = labels.notna().to_numpy()
    counts = labels[keep].value_counts()
    if (counts >= 2).sum() < 2:
        raise InputError(f"{func}: obs[{niche_key!r}] needs at least 2 niches with >= 2 spots")
    x = log_normalized(adata, layer)[keep]
    tmp = AnnData(x, obs=pd.DataFrame({"niche": labels[keep].astype(str).values}))
    tmp.var_names = adata.var_names.astype(str)
    tmp.obs["niche"] = tmp.obs["niche"].astype("category")
    groups = [g for g in tmp.obs["niche"].cat.categories if counts.get(g, 0) >= 2]
    tmp.uns["log1p"] = {"base": None}
    sc.tl.rank_genes_groups(
        tmp, "niche", groups=groups, reference="rest", method=method, n_genes=n_genes, pts=False
    )
    frames = []
    for g in groups:
        d = sc.get.rank_genes_groups_df(tmp, group=g)
        d = d.head(n_genes)
        frames.append(
            pd.DataFrame(
                {
                    "niche": g,
                    "gene": d["names"].astype(str).to_numpy(),
                    "logfc": d["logfoldchanges"].to_numpy(dtype=np.float64)
                    if "logfoldchanges" in d
                    else np.nan,
                    "pval": d["pvals"].to_numpy(dtype=np.float64) if "pvals" in d else np.nan,
                    "padj": d["pvals_adj"].to_numpy(dtype=np.float64)
                    if "pvals_adj" in d
                    else np.nan,
                    "score": d["scores"].to_numpy(dtype=np.float64),
                }
            )
        )
    out = pd.concat(frames, ignore_index=True)
    store_params(
        adata,
        key_added or f"{niche_key}_markers",
        {"niche_key": niche_key, "n_genes": n_genes, "method": method, "layer": layer},
        markers=out,
    )
    return out
