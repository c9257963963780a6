"""Cell-type composition of niches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from tissuegraph.errors import InputError
from tissuegraph.tl._core import NICHE_KEY, check_adata, label_codes, require_obs, store_params


def _proportion_frame(adata, proportions, func: str) -> pd.DataFrame:
    if isinstance(proportions, str):
        if proportions not in adata.obsm:
            raise InputError(
                f"{func}: obsm[{proportions!r}] not found: add per-spot cell-type proportions "
                "(e.g. from deconvolution) as a DataFrame in obsm"
            )
        p = adata.obsm[proportions]
        if isinstance(p, pd.DataFrame):
            df = p.copy()
        else:
            arr = np.asarray(p)
            names = None
            sim = adata.uns.get("simulation") or {}
            if proportions == "true_proportions" and "cell_types" in sim:
                names = [str(c) for c in sim["cell_types"]]
            if names is None or len(names) != arr.shape[1]:
                names = [f"type_{i}" for i in range(arr.shape[1])]
            df = pd.DataFrame(arr, index=adata.obs_names, columns=names)
    else:
        cols = list(proportions)
        missing = [c for c in cols if c not in adata.obs]
        if missing:
            raise InputError(f"{func}: obs column {missing[0]!r} of proportions not found")
        df = adata.obs[cols].copy()
    df = df.apply(pd.to_numeric, errors="coerce").astype(np.float64)
    if (df.to_numpy()[np.isfinite(df.to_numpy())] < 0).any():
        raise InputError(f"{func}: proportions must be non-negative")
    return df


def niche_composition(
    adata,
    *,
    niche_key: str = NICHE_KEY,
    cell_types: str | None = None,
    proportions: str | Sequence[str] | None = None,
    normalize: bool = True,
    key_added: str | None = None,
) -> pd.DataFrame:
    """Cell-type composition of each niche.

    Give either ``cell_types`` (an obs column with one cell type per spot/cell: the
    composition is the fraction of each type among the niche's spots) or ``proportions``
    (an obsm key holding a spots x cell types DataFrame/array, or a list of obs columns,
    e.g. deconvolution output: the composition is the mean proportion over the niche's
    spots; spots with missing proportions are left out).

    Parameters
    ----------
    adata
        AnnData with ``obs[niche_key]``.
    niche_key
        obs column of the niche labels (from :func:`niches`).
    cell_types, proportions
        Exactly one of them.
    normalize
        Rescale each row to sum to 1.
    key_added
        uns key (default ``f"{niche_key}_composition"``).

    Returns
    -------
    DataFrame niches x cell types (index: niche labels), also written to
    ``uns[key_added]`` (``{"composition": DataFrame, "n_spots": dict, "params"}``).
    """
    func = "niche_composition"
    check_adata(adata, func)
    labels = require_obs(adata, niche_key, func, "tissuegraph.tl.niches")
    if (cell_types is None) == (proportions is None):
        raise InputError(f"{func}: give exactly one of cell_types= or proportions=")
    codes, cats = label_codes(labels)
    if cell_types is not None:
        ct = require_obs(adata, cell_types, func)
        df = pd.get_dummies(ct.astype("category"), dtype=np.float64)
        df.columns = [str(c) for c in df.columns]
        df.loc[ct.isna().to_numpy()] = np.nan
    else:
        df = _proportion_frame(adata, proportions, func)
    valid = (codes >= 0) & np.isfinite(df.to_numpy()).all(axis=1)
    if not valid.any():
        raise InputError(f"{func}: no spot has both a niche label and proportions")
    sub = df.loc[valid]
    sub.index = pd.Index([cats[c] for c in codes[valid]], name=niche_key)
    comp = sub.groupby(level=0, sort=False).mean().reindex(cats)
    if normalize:
        comp = comp.div(comp.sum(axis=1).replace(0, np.nan), axis=0)
    comp.index.name = niche_key
    n_spots = pd.Series(codes[valid]).value_counts().reindex(range(len(cats)), fill_value=0)
    key = key_added or f"{niche_key}_composition"
    store_params(
        adata,
        key,
        {
            "niche_key": niche_key,
            "cell_types": cell_types,
            "proportions": proportions
            if isinstance(proportions, (str, type(None)))
            else list(proportions),
            "normalize": normalize,
        },
        composition=comp,
        n_spots={cats[i]: int(v) for i, v in enumerate(n_spots.to_numpy())},
    )
    return comp
