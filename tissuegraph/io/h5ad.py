"""``.h5ad`` reading and atomic writing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tissuegraph._utils import atomic_path
from tissuegraph.errors import InputError
from tissuegraph.io._common import as_path

__all__ = ["read_h5ad", "write_h5ad", "sanitize_uns"]


def read_h5ad(path: str | os.PathLike):
    """Read an ``.h5ad`` file (scanpy / squidpy layout).

    ``uns["tissuegraph"]["image_path"]`` is restored to ``None`` when it was stored empty.
    """
    import anndata as ad

    path = as_path(path, "h5ad file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; pass an .h5ad file")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # h5py / anndata raise many types on bad files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: unreadable .h5ad ({msg}); re-write it with anndata") from None
    tg = adata.uns.get("tissuegraph")
    if isinstance(tg, dict) and "image_path" in tg and not tg["image_path"]:
        tg["image_path"] = None
    return adata


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
