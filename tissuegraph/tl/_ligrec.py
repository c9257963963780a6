"""Ligand -> receptor signalling between niches over neighbouring spots."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tissuegraph.errors import InputError
from tissuegraph.tl._core import (
    NICHE_KEY,
    bh_adjust,
    check_adata,
    check_int,
    label_codes,
    log_normalized,
    match_genes_ci,
    require_obs,
    store_params,
)
from tissuegraph.tl._spatial import CONN_KEY, ensure_spatial_graph


def liana_consensus() -> pd.DataFrame:
    """LIANA's shipped ``consensus`` ligand-receptor resource (``ligand``, ``receptor``;
    complexes as ``A_B``), read with ``liana.resource.select_resource``.

    liana is optional: without it this fails with the install command.
    """
    from tissuegraph.errors import require

    require("liana", None, "the default ligand-receptor table (or pass lr_table)")
    from liana.resource import select_resource

    return select_resource("consensus")


def _read_lr(table, func: str) -> pd.DataFrame:
    if table is None:
        table = liana_consensus()
    if isinstance(table, (str, os.PathLike)):
        from tissuegraph.io import read_ligand_receptor

        table = read_ligand_receptor(table)
    if not isinstance(table, pd.DataFrame):
        raise InputError(f"{func}: lr_table must be a DataFrame or a path")
    cols = {c.lower(): c for c in table.columns}
    if "ligand" not in cols or "receptor" not in cols:
        raise InputError(f"{func}: lr_table needs columns ligand and receptor")
    return pd.DataFrame(
        {
            "ligand": table[cols["ligand"]].astype(str),
            "receptor": table[cols["receptor"]].astype(str),
        }
    ).drop_duplicates()


def ligand_receptor(
    adata,
    lr_table=None,
    *,
    niche_key: str = NICHE_KEY,
    n_perms: int = 100,
    min_frac: float = 0.05,
    min_edges: int = 10,
    include_self: bool = True,
    connectivity_key: str = CONN_KEY,
    layer: str | None = None,
    seed: int = 0,
    key_added: str | None = None,
) -> pd.DataFrame:
    """Ligand (sender niche) -> receptor (receiver niche) co-expression over neighbours.

    For every pair of neighbouring spots ``(i, j)`` on the spatial graph (plus ``i = j``
    when ``include_self``), the score of a ligand-receptor pair between a sender niche
    ``s`` and a receiver niche ``r`` is the mean of ``L_i * R_j`` (log-normalised
    expression) over the edges with ``i`` in ``s`` and ``j`` in ``r``. The p-value is
    the fraction of ``n_perms`` permutations of the niche labels giving a score at least
    as high (``(1 + #) / (1 + n_perms)``), Benjamini-Hochberg adjusted over all tests.
    Subunits of complexes (``A_B``) are combined by their minimum. Pairs whose ligand or
    receptor is expressed in fewer than ``min_frac`` of the spots are skipped.

    Parameters
    ----------
    adata
        AnnData with expression and ``obs[niche_key]``.
    lr_table
        DataFrame with ``ligand`` and ``receptor`` columns (e.g.
        ``tissuegraph.io.read_ligand_receptor``) or a path. ``None``: LIANA's consensus
        resource shipped with the ``liana`` package (:func:`liana_consensus`; needs
        ``pip install liana``).
    niche_key
        obs column of niche labels.
    n_perms
        Label permutations for the p-values.
    min_frac
        Minimum fraction of spots expressing a ligand and a receptor.
    min_edges
        Minimum number of sender -> receiver spot pairs for a niche pair to be tested.
    include_self
        Also count signalling within a spot (autocrine / same-spot juxtacrine).
    connectivity_key
        obsp key of the spatial graph (built when absent).
    layer
        Expression layer instead of ``X``.
    seed
        Seed of the permutations.
    key_added
        uns key (default ``f"{niche_key}_ligand_receptor"``).

    Returns
    -------
    Tidy DataFrame ``ligand, receptor, sender, receiver, score, pval, padj, n_edges``
    sorted by p-value then score, also written to ``uns[key_added]`` (``results``,
    ``params``), plus the spatial graph when it was absent.
    """
    func = "ligand_receptor"
    check_adata(adata, func)
    labels = require_obs(adata, niche_key, func, "tissuegraph.tl.niches")
    n_perms = check_int(n_perms, "n_perms", func)
    if not 0 <= min_frac < 1:
        raise InputError(f"{func}: min_frac must be in [0, 1), got {min_frac!r}")
    lr = _read_lr(lr_table, func)
    codes, cats = label_codes(labels)
    k = len(cats)
    x = log_normalized(adata, layer).tocsc()
    expressed = np.asarray((x > 0).mean(axis=0)).ravel()
    var = list(adata.var_names)
    hits = match_genes_ci(
        {s for v in pd.concat([lr.ligand, lr.receptor]) for s in v.split("_")}, var
    )

    def gene_vec(symbol: str):
        parts = symbol.split("_")
        idx = [hits.get(p) for p in parts]
        if any(i is None for i in idx) or min(expressed[i] for i in idx) < min_frac:
            return None
        cols = x[:, idx].toarray()
        return cols.min(axis=1)

    lig_cols, rec_cols, pairs = [], [], []
    cache: dict[str, np.ndarray | None] = {}
    for lig, rec in lr.itertuples(index=False):
        for s in (lig, rec):
            if s not in cache:
                cache[s] = gene_vec(s)
        if cache[lig] is not None and cache[rec] is not None:
            lig_cols.append(cache[lig])
            rec_cols.append(cache[rec])
            pairs.append((lig, rec))
    if not pairs:
        raise InputError(
            f"{func}: no ligand-receptor pair of the table is expressed in the panel "
            f"(min_frac={min_frac})"
        )
    adj = ensure_spatial_graph(adata, connectivity_key).tocoo()
    row, col = adj.row.astype(np.int64), adj.col.astype(np.int64)
    if include_self:
        ids = np.arange(adata.n_obs)
        row, col = np.concatenate([row, ids]), np.concatenate([col, ids])
    valid = (codes[row] >= 0) & (codes[col] >= 0)
    row, col = row[valid], col[valid]
    lmat = np.stack(lig_cols, axis=1).astype(np.float32)
    rmat = np.stack(rec_cols, axis=1).astype(np.float32)
    prod = lmat[row] * rmat[col]  # [E, P]
    n_e = row.size

    def aggregate(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        grp = c[row] * k + c[col]
        onehot = sp.csr_matrix(
            (np.ones(n_e, dtype=np.float32), (grp, np.arange(n_e))), shape=(k * k, n_e)
        )
        sums = onehot @ prod
        n = np.bincount(grp, minlength=k * k).astype(np.float64)
        return np.divide(sums, n[:, None], out=np.zeros_like(sums), where=n[:, None] > 0), n

    observed, n_edges = aggregate(codes)
    rng = np.random.default_rng(seed)
    exceed = np.zeros_like(observed)
    lab = codes.copy()
    m = codes >= 0
    for _ in range(n_perms):
        perm = lab.copy()
        perm[m] = rng.permutation(lab[m])
        null, _ = aggregate(perm)
        exceed += null >= observed - 1e-12
    pval = (1.0 + exceed) / (1.0 + n_perms)
    s_idx, r_idx = np.divmod(np.arange(k * k), k)
    frames = []
    for p, (lig, rec) in enumerate(pairs):
        frames.append(
            pd.DataFrame(
                {
                    "ligand": lig,
                    "receptor": rec,
                    "sender": np.asarray(cats)[s_idx],
                    "receiver": np.asarray(cats)[r_idx],
                    "score": observed[:, p],
                    "pval": pval[:, p],
                    "n_edges": n_edges.astype(np.int64),
                }
            )
        )
    out = pd.concat(frames, ignore_index=True)
    out = out[out["n_edges"] >= max(min_edges, 1)]
    out = out[out["score"] > 0].reset_index(drop=True)
    out.insert(6, "padj", bh_adjust(out["pval"].to_numpy()))
    out = out.sort_values(["pval", "score"], ascending=[True, False]).reset_index(drop=True)
    if lr_table is None:
        source = "liana consensus"
    elif isinstance(lr_table, (str, os.PathLike)):
        source = str(lr_table)
    else:
        source = "DataFrame"
    store_params(
        adata,
        key_added or f"{niche_key}_ligand_receptor",
        {
            "niche_key": niche_key,
            "n_perms": n_perms,
            "min_frac": min_frac,
            "min_edges": min_edges,
            "include_self": include_self,
            "connectivity_key": connectivity_key,
            "seed": seed,
            "lr_table": source,
        },
        results=out,
    )
    return out
