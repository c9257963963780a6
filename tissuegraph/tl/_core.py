"""Shared helpers of :mod:`tissuegraph.tl`: input validation, normalisation, parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tissuegraph import _layout as L
from tissuegraph._genes import match_ci
from tissuegraph.errors import InputError

#: default obsm key of the tissuegraph spot embedding
EMBED_KEY = L.EMBEDDING
#: default obs key of the niche labels
NICHE_KEY = "tg_niche"


def check_adata(adata, func: str) -> None:
    """Fail with one line unless ``adata`` is a non-empty AnnData."""
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        from tissuegraph.io.sdata import is_spatialdata

        hint = ""
        if is_spatialdata(adata):  # tl.embed, tl.niches and tl.predict_expression take one
            hint = ": convert it with tissuegraph.io.read_spatialdata(sdata, table_key=...)"
        raise InputError(f"{func}: expected an AnnData, got {type(adata).__name__}{hint}")
    if adata.n_obs == 0:
        raise InputError(f"{func}: the AnnData has no spots (n_obs == 0)")


def require_obsm(adata, key: str, func: str, producer: str | None = None) -> np.ndarray:
    """``adata.obsm[key]`` as a float ndarray, or an error naming the function to run first."""
    if key not in adata.obsm:
        hint = f": run {producer} first" if producer else ""
        raise InputError(f"{func}: obsm[{key!r}] not found{hint}")
    x = adata.obsm[key]
    x = x.to_numpy() if isinstance(x, pd.DataFrame) else x
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    if x.ndim != 2 or x.shape[0] != adata.n_obs:
        raise InputError(f"{func}: obsm[{key!r}] must be a 2-D array with one row per spot")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise InputError(f"{func}: obsm[{key!r}] contains NaN or infinite values")
    return x


def require_obs(adata, key: str, func: str, producer: str | None = None) -> pd.Series:
    """``adata.obs[key]`` as a categorical Series (NaN allowed), or a one-line error."""
    if key not in adata.obs:
        hint = f": run {producer} first" if producer else ""
        raise InputError(f"{func}: obs[{key!r}] not found{hint}")
    s = adata.obs[key]
    if not isinstance(s.dtype, pd.CategoricalDtype):
        s = s.astype("category")
    if s.cat.categories.size < 1 or s.notna().sum() == 0:
        raise InputError(f"{func}: obs[{key!r}] has no labels")
    return s


def label_codes(labels: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Integer codes (``-1`` for missing) and category names of a categorical Series."""
    cat = labels.astype("category")
    return cat.cat.codes.to_numpy().astype(np.int64), [str(c) for c in cat.cat.categories]


def check_int(value, name: str, func: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{func}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(value, name: str, choices: Sequence[str], func: str) -> str:
    if value not in choices:
        raise InputError(f"{func}: {name} must be one of {list(choices)}, got {value!r}")
    return value


def is_count_matrix(x) -> bool:
    """Heuristic: non-negative integer values (raw counts) in a sample of the matrix."""
    data = x.data if sp.issparse(x) else np.asarray(x).ravel()
    if data.size == 0:
        return True
    sample = data[: min(data.size, 100_000)]
    return bool(np.all(sample >= 0) and np.allclose(sample, np.round(sample)))


def log_normalized(adata, layer: str | None = None, target_sum: float = 1e4) -> sp.csr_matrix:
    """Library-size normalised ``log1p`` expression (a new matrix; ``adata`` is untouched).

    Raw counts (integer values) are scaled to ``target_sum`` per spot and log-transformed;
    a matrix that already holds non-integer values is taken as normalised.
    """
    x = adata.layers[layer] if layer is not None else adata.X
    if layer is not None and layer not in adata.layers:
        raise InputError(f"layer {layer!r} not found in adata.layers")
    x = sp.csr_matrix(x, dtype=np.float32, copy=True)
    if is_count_matrix(x):
        libsize = np.asarray(x.sum(axis=1)).ravel()
        scale = np.divide(target_sum, libsize, out=np.zeros_like(libsize), where=libsize > 0)
        x = sp.diags(scale.astype(np.float32)) @ x
        x.data = np.log1p(x.data)
    return sp.csr_matrix(x, dtype=np.float32)


def store_params(adata, key: str, params: dict[str, Any], **extra) -> None:
    """Write ``uns[key] = {"params": params, **extra}`` (replacing an older entry)."""
    clean = {k: _plain(v) for k, v in params.items()}
    adata.uns[key] = {"params": clean, **extra}


def _plain(v):
    if v is None:
        return "None"
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def match_genes_ci(query: Sequence[str], var_names: Sequence[str]) -> dict[str, int]:
    """Map each query symbol to its column in ``var_names`` (case-insensitive, first hit)."""
    return match_ci(query, var_names)


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaN kept)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    if q.size:
        order = np.argsort(q)
        ranked = q[order] * q.size / np.arange(1, q.size + 1)
        ranked = np.minimum.accumulate(ranked[::-1])[::-1]
        res = np.empty_like(q)
        res[order] = np.clip(ranked, 0, 1)
        out[ok] = res
    return out


# ----------------------------------------------------------------------------- colours
def default_palette(n: int) -> list[str]:
    """``n`` distinguishable colours as hex strings: tab10 (up to 10), tab20 (up to 20),
    else evenly spaced hues."""
    import matplotlib as mpl
    from matplotlib.colors import to_hex

    if n <= 10:
        cmap, pts = mpl.colormaps["tab10"], list(range(n))
    elif n <= 20:
        cmap, pts = mpl.colormaps["tab20"], list(range(n))
    else:
        cmap, pts = mpl.colormaps["hsv"], [i / n for i in range(n)]
    return [to_hex(cmap(p)) for p in pts]


def category_colors(adata, key: str, *, write: bool = True) -> list[str]:
    """One colour per category of ``obs[key]``, in scanpy's convention.

    ``uns[f"{key}_colors"]`` is used when it holds a valid colour for every category (as
    scanpy, extra colours are ignored); otherwise :func:`default_palette` is used and, with
    ``write``, stored there, so that ``sc.pl.spatial`` / ``sc.pl.embedding``, squidpy and
    :mod:`tissuegraph.pl` draw a category in the same colour.
    """
    from matplotlib.colors import is_color_like, to_hex

    cats = adata.obs[key].astype("category").cat.categories
    n = len(cats)
    stored = adata.uns.get(f"{key}_colors")
    if stored is not None:
        stored = np.asarray(stored, dtype=object).ravel().tolist()
        if len(stored) >= n and all(is_color_like(c) for c in stored[:n]):
            return [to_hex(c, keep_alpha=False) for c in stored[:n]]
    colors = default_palette(n)
    if write:
        adata.uns[f"{key}_colors"] = list(colors)
    return colors
