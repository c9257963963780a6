"""``.h5ad`` reading and atomic writing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tissuegraph import _layout as L
from tissuegraph._utils import atomic_path
from tissuegraph.errors import InputError
from tissuegraph.io._common import (
    EXPRESSION,
    as_path,
    check_values,
    one_line,
    sparse_index_problem,
)

__all__ = ["read_h5ad", "write_h5ad", "sanitize_uns"]


def read_h5ad(path: str | os.PathLike, *, expression: str | None = None):
    """Read an ``.h5ad`` file (scanpy / squidpy layout).

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    expression
        What ``X`` holds: ``"raw"`` integer counts, or ``"normalized"`` expression (e.g.
        scanpy's log1p of library-size normalised counts, or predicted values), accepted only
        when declared. ``None`` (default): what the file itself records in
        ``uns["tissuegraph"]["expression"]`` (tissuegraph writes it for an AnnData read with
        ``expression="normalized"`` and for predictions), else ``"raw"``. NaN and infinite
        values are refused either way; with ``"raw"`` so are negative and non-integer values.

    Returns
    -------
    The AnnData. ``uns["tissuegraph"]["image_path"]`` is restored to ``None`` when it was
    stored empty; ``uns["tissuegraph"]["expression"]`` records ``expression`` when
    ``uns["tissuegraph"]`` exists.
    """
    import anndata as ad

    if expression is not None and expression not in EXPRESSION:
        raise InputError(
            f"read_h5ad: expression={expression!r} is unknown: choose {' or '.join(EXPRESSION)}"
        )
    path = as_path(path, "h5ad file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; pass an .h5ad file")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # h5py / anndata raise many types on bad files
        raise InputError(
            f"{path}: unreadable .h5ad ({one_line(exc)}); re-write it with anndata"
        ) from None
    tg = adata.uns.get(L.TISSUEGRAPH)
    if expression is None:
        recorded = tg.get("expression") if isinstance(tg, dict) else None
        expression = str(recorded) if recorded in EXPRESSION else "raw"
    _check_layout(adata, path, expression)
    if isinstance(tg, dict):
        if L.IMAGE_PATH in tg and not tg[L.IMAGE_PATH]:
            tg[L.IMAGE_PATH] = None
        tg["expression"] = expression
    return adata


def _check_layout(adata, path: Path, expression: str) -> None:
    """Refuse an AnnData whose ``X`` or spot coordinates would put bad numbers in a graph."""
    import scipy.sparse as sp

    X = adata.X
    if X is None:
        raise InputError(f"{path}: X is empty; store the spots x genes matrix in X")
    if sp.issparse(X):
        if X.format not in ("csr", "csc"):
            raise InputError(f"{path}: X is a {X.format} matrix; store it as CSR or CSC")
        major, minor = X.shape if X.format == "csr" else X.shape[::-1]
        problem = sparse_index_problem(X.indptr, X.indices, major, minor)
        if problem is None and len(X.data) != len(X.indices):
            problem = f"{len(X.data)} values for {len(X.indices)} indices"
        if problem:
            raise InputError(f"{path}: X is a corrupt sparse matrix ({problem})")
    elif not isinstance(X, np.ndarray):
        raise InputError(f"{path}: X is a {type(X).__name__}; expected an array or sparse matrix")
    check_values(
        X,
        source=path,
        obs_names=adata.obs_names,
        var_names=adata.var_names,
        expression=expression,
        what="counts in X" if expression == "raw" else "expression in X",
    )
    obs = adata.obs
    if "in_tissue" in obs and not pd.Series(obs["in_tissue"]).isin((0, 1, True, False)).all():
        raise InputError(f"{path}: obs['in_tissue'] holds values other than 0 and 1")
    for key in ("array_row", "array_col"):
        if key not in obs:
            continue
        v = pd.to_numeric(pd.Series(obs[key]), errors="coerce").to_numpy(dtype=np.float64)
        if not (np.isfinite(v) & (v == np.round(v))).all():
            raise InputError(f"{path}: obs[{key!r}] holds values that are not whole numbers")
    for key in (L.SPATIAL, L.SPATIAL_UM):
        if key not in adata.obsm:
            continue
        xy = np.asarray(adata.obsm[key])
        if xy.ndim != 2 or xy.shape[1] < 2 or xy.dtype.kind not in "iuf":
            raise InputError(f"{path}: obsm[{key!r}] is not an n_obs x 2 array of coordinates")
        if not np.isfinite(xy).all():
            raise InputError(f"{path}: obsm[{key!r}] holds NaN or infinite coordinates")


def sanitize_uns(obj: Any) -> Any:
    """A copy of ``obj`` that h5py / anndata can store: ``None`` -> ``""``, paths -> str,
    tuples / sets -> lists (arrays when homogeneous), keys -> str."""
    if obj is None:
        return ""
    if isinstance(obj, dict):
        return {str(k): sanitize_uns(v) for k, v in obj.items()}
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        obj = sorted(obj, key=str)
    if isinstance(obj, (list, tuple)):
        items = [sanitize_uns(v) for v in obj]
        if items and all(isinstance(v, str) for v in items):
            return np.array(items, dtype=object)
        if items and all(isinstance(v, (bool, np.bool_)) for v in items):
            return np.array(items, dtype=bool)
        if items and all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            for v in items
        ):
            return np.asarray(items)
        return {str(i): v for i, v in enumerate(items)}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def write_h5ad(adata, path: str | os.PathLike, *, compression: str | None = "gzip") -> Path:
    """Write ``adata`` to ``path`` atomically (a temporary file renamed on success).

    ``uns`` is made storable first (see :func:`sanitize_uns`); ``adata`` itself is unchanged.
    Returns the path written.
    """
    path = Path(path)
    uns = adata.uns
    try:
        adata.uns = sanitize_uns(dict(uns))
        with atomic_path(path) as tmp:
            adata.write_h5ad(tmp, compression=compression)
    finally:
        adata.uns = uns
    return path
