"""Pathway activity per spot and per niche from a weighted gene table (e.g. PROGENy)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from tissuegraph.errors import InputError
from tissuegraph.tl._core import (
    check_adata,
    check_choice,
    check_int,
    label_codes,
    log_normalized,
    match_genes_ci,
    require_obs,
    store_params,
)


def read_weight_table(table, func: str) -> pd.DataFrame:
    """A ``[source, target, weight]`` table from a DataFrame or a file path."""
    if isinstance(table, (str, os.PathLike)):
        from tissuegraph.io import read_pathways

        table = read_pathways(table)
    if not isinstance(table, pd.DataFrame):
        raise InputError(f"{func}: pathways must be a DataFrame or a path to a table")
    cols = {c.lower(): c for c in table.columns}
    if "source" not in cols or "target" not in cols:
        raise InputError(f"{func}: the pathway table needs columns source, target (and weight)")
    out = pd.DataFrame(
        {
            "source": table[cols["source"]].astype(str),
            "target": table[cols["target"]].astype(str),
            "weight": pd.to_numeric(table[cols["weight"]], errors="coerce")
            if "weight" in cols
            else 1.0,
        }
    ).dropna()
    if out.empty:
        raise InputError(f"{func}: the pathway table is empty")
    return out


def pathway_weights(table: pd.DataFrame, var_names, min_size: int) -> tuple[np.ndarray, list, dict]:
    """Gene x pathway weight matrix over ``var_names`` (case-insensitive matching)."""
    hits = match_genes_ci(table["target"].unique(), list(var_names))
    names = sorted(table["source"].unique())
    col = {p: i for i, p in enumerate(names)}
    w = np.zeros((len(var_names), len(names)), dtype=np.float64)
    for s, t, v in table.itertuples(index=False):
        j = hits.get(t)
        if j is not None:
            w[j, col[s]] = v
    size = (w != 0).sum(axis=0)
    keep = size >= min_size
    coverage = {p: int(size[i]) for i, p in enumerate(names)}
    return w[:, keep], [p for p, k in zip(names, keep) if k], coverage


BACKENDS = ("tissuegraph", "decoupler")


def _zscored_genes(adata, layer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-normalised expression as CSR, and per-gene mean and sd over spots."""
    x = log_normalized(adata, layer)
    mean = np.asarray(x.mean(axis=0), dtype=np.float64).ravel()
    sq = np.asarray(x.multiply(x).mean(axis=0), dtype=np.float64).ravel()
    sd = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    return x, mean, sd


def _decoupler_scores(x, obs_names, w, names, method, min_size) -> np.ndarray:
    """The same scores computed by decoupler (>= 2) on the same z-scored matrix and weights."""
    from tissuegraph.errors import MissingDependencyError, require

    dc = require("decoupler", "decoupler", "pathway_activity(backend='decoupler')")
    if not hasattr(dc, "mt"):
        raise MissingDependencyError(
            "pathway_activity(backend='decoupler') needs decoupler >= 2 (dc.mt): "
            "pip install 'tissuegraph[decoupler]'"
        )
    cols = [f"g{i}" for i in range(x.shape[1])]  # unique names, whatever var_names are
    gi, pj = np.nonzero(w)
    net = pd.DataFrame(
        {
            "source": np.asarray(names, dtype=object)[pj],
            "target": np.asarray(cols, dtype=object)[gi],
            "weight": w[gi, pj],
        }
    )
    df = pd.DataFrame(x, index=[str(o) for o in obs_names], columns=cols)
    if method == "ulm":
        es, _ = dc.mt.ulm(df, net, tmin=min_size, verbose=False)
    else:
        es, _ = dc.mt.waggr(df, net, fun="wmean", times=0, tmin=min_size, verbose=False)
    es = es.reindex(index=df.index, columns=list(names))
    return es.to_numpy(dtype=np.float64, na_value=0.0)


def pathway_activity(
    adata,
    pathways,
    *,
    method: str = "wmean",
    backend: str = "tissuegraph",
    niche_key: str | None = None,
    layer: str | None = None,
    min_size: int = 5,
    key_added: str = "tg_pathways",
    copy: bool = False,
):
    """Pathway (or TF) activity per spot and per niche.

    Expression is library-size normalised, ``log1p``-transformed and z-scored per gene
    over spots; genes constant over the spots carry no signal and are left out. With
    weights ``w_gp`` of gene ``g`` in pathway ``p``:

    - ``wmean``: ``a_sp = sum_g w_gp z_sg / sum_g |w_gp|`` (weighted mean);
    - ``ulm``: the t-value of the slope of a univariate linear model ``z_s ~ w_p`` across
      all (non-constant) genes, genes outside the pathway having weight 0.

    These are decoupler's methods: on this z-scored input ``ulm`` equals
    ``decoupler.mt.ulm`` and ``wmean`` equals ``decoupler.mt.waggr(fun="wmean", times=0)``
    (the estimate without permutations) to floating-point precision.
    ``backend="decoupler"`` computes them with decoupler itself (optional:
    ``pip install 'tissuegraph[decoupler]'``, decoupler >= 2).

    Pathways with fewer than ``min_size`` genes among the non-constant panel genes are
    dropped (coverage in uns). Gene symbols match case-insensitively.

    Parameters
    ----------
    adata
        AnnData with expression (raw counts or log-normalised).
    pathways
        ``[source, target, weight]`` DataFrame (``tissuegraph.io.read_pathways``) or a path.
    method
        ``"wmean"`` or ``"ulm"``.
    backend
        ``"tissuegraph"`` (numpy) or ``"decoupler"``.
    niche_key
        obs column of niche labels: also average the activities per niche.
    layer
        Expression layer instead of ``X``.
    min_size
        Minimum number of panel genes of a pathway.
    key_added
        obsm/uns key.

    Returns
    -------
    Writes ``obsm[key_added]`` (DataFrame spots x pathways) and ``uns[key_added]``
    (``params``, ``coverage``: genes found per pathway, and ``niche_mean``: DataFrame
    niches x pathways when ``niche_key`` is given). ``None``, or the copy.
    """
    func = "pathway_activity"
    check_adata(adata, func)
    check_choice(method, "method", ("wmean", "ulm"), func)
    check_choice(backend, "backend", BACKENDS, func)
    min_size = check_int(min_size, "min_size", func)
    table = read_weight_table(pathways, func)
    labels = require_obs(adata, niche_key, func, "tissuegraph.tl.niches") if niche_key else None
    xs, mean, sd = _zscored_genes(adata, layer)
    varying = np.flatnonzero(sd > 0)
    w, names, coverage = pathway_weights(table, [adata.var_names[i] for i in varying], min_size)
    if not names:
        raise InputError(
            f"{func}: no pathway has >= {min_size} genes of the panel; check gene symbols "
            "or lower min_size"
        )
    adata = adata.copy() if copy else adata
    genes = np.flatnonzero((w != 0).any(axis=1)) if method == "wmean" else np.arange(w.shape[0])
    cols = varying[genes]
    x = xs[:, cols].toarray().astype(np.float64)
    x -= mean[cols]
    x /= sd[cols]
    wg = w[genes]
    if backend == "decoupler":
        act = _decoupler_scores(x, adata.obs_names, wg, names, method, min_size)
    elif method == "wmean":
        act = x @ wg / np.abs(wg).sum(axis=0, keepdims=True)
    else:
        g = wg.shape[0]
        wc = wg - wg.mean(axis=0, keepdims=True)
        sxx = (wc * wc).sum(axis=0)
        yc = x - x.mean(axis=1, keepdims=True)
        beta = yc @ wc / sxx
        syy = (yc * yc).sum(axis=1, keepdims=True)
        rss = np.maximum(syy - beta**2 * sxx, 0.0)
        se = np.sqrt(rss / max(g - 2, 1) / sxx)
        act = np.divide(beta, se, out=np.zeros_like(beta), where=se > 0)
    df = pd.DataFrame(act.astype(np.float32), index=adata.obs_names, columns=names)
    adata.obsm[key_added] = df
    extra = {"coverage": coverage}
    if labels is not None:
        codes, cats = label_codes(labels)
        m = codes >= 0
        nm = df[m].groupby(np.asarray(cats)[codes[m]]).mean().reindex(cats)
        nm.index.name = niche_key
        extra["niche_mean"] = nm
    store_params(
        adata,
        key_added,
        {
            "method": method,
            "backend": backend,
            "niche_key": niche_key,
            "layer": layer,
            "min_size": min_size,
        },
        **extra,
    )
    return adata if copy else None
