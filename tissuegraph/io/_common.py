"""Helpers shared by the readers: value checks, errors (the AnnData layout and its
constructor live in :mod:`tissuegraph._layout`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from tissuegraph._layout import make_unique  # noqa: F401 (re-exported)
from tissuegraph.errors import InputError, one_line  # noqa: F401 (one_line: re-exported)

PLATFORMS = ("visium", "visium_hd", "st", "synthetic")
#: What a matrix may hold: ``raw`` integer counts, or ``normalized`` expression (e.g. log1p).
EXPRESSION = ("raw", "normalized")


def as_path(path: str | os.PathLike, what: str) -> Path:
    """``Path(path)``, failing with an :class:`InputError` when it does not exist."""
    if path is None:
        raise InputError(f"{what}: no path given; pass the path of the {what}")
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{what} not found: {p} (check the path)")
    return p


def sparse_index_problem(indptr, indices, n_major: int, n_minor: int) -> str | None:
    """What is wrong with the index arrays of a CSR (CSC) matrix of ``n_major`` rows
    (columns) and ``n_minor`` columns (rows), or ``None``.

    Checked in full, unlike scipy's ``check_format``, which skips its range checks when
    the last index pointer is not positive (and then crashes later on such a matrix)."""
    indptr, indices = np.asarray(indptr), np.asarray(indices)
    if indptr.dtype.kind not in "iu" or indices.dtype.kind not in "iu":
        return f"index arrays of type {indptr.dtype} / {indices.dtype}, not integers"
    if indptr.ndim != 1 or indices.ndim != 1 or len(indptr) != n_major + 1:
        return f"{len(indptr)} index pointers for {n_major} rows"
    if indptr[0] != 0 or indptr[-1] != len(indices):
        return f"index pointers run from {indptr[0]} to {indptr[-1]}, not 0 to {len(indices)}"
    if (np.diff(indptr) < 0).any():
        return "index pointers decrease"
    if len(indices) and (indices.min() < 0 or indices.max() >= n_minor):
        return f"indices outside 0..{n_minor - 1}"
    return None


def check_values(
    X,
    *,
    source: str | os.PathLike,
    obs_names=None,
    var_names=None,
    expression: str = "raw",
    allow_negative: bool | None = None,
    what: str = "counts",
) -> None:
    """Refuse a spots x genes matrix holding values no reader may pass on.

    NaN and infinite entries are always refused. ``expression="raw"`` (counts) also refuses
    negative and non-integer entries; ``"normalized"`` refuses negative entries only when
    ``allow_negative`` is false (default: allowed, as in scaled or predicted values). ``X``
    is a scipy sparse matrix or a 2-D array; only stored entries of a sparse matrix are
    looked at.

    Raises
    ------
    InputError
        One line naming ``source``, the number of bad entries by kind, and the first one
        (spot, gene and value, in row-major order).
    """
    if expression not in EXPRESSION:
        raise InputError(
            f"expression={expression!r} is unknown: choose one of {', '.join(EXPRESSION)}"
        )
    if sp.issparse(X):
        m = X.tocsr()
        data = np.asarray(m.data)

        def where(i: int) -> tuple[int, int]:
            return int(np.searchsorted(m.indptr, i, side="right") - 1), int(m.indices[i])
    else:
        a = np.asarray(X)
        if a.ndim != 2:
            raise InputError(f"{source}: the {what} are not a 2-D spots x genes matrix")
        data = a.ravel()

        def where(i: int) -> tuple[int, int]:
            return divmod(int(i), a.shape[1])

    if data.dtype.kind not in "biuf":
        raise InputError(
            f"{source}: the {what} are of type {data.dtype}, not numbers; expected a numeric "
            "spots x genes matrix"
        )
    if data.dtype.kind in "bu" or data.size == 0:
        return
    kinds: list[tuple[str, np.ndarray]] = []
    if data.dtype.kind == "f":
        kinds.append(("NaN", np.isnan(data)))
        kinds.append(("infinite", np.isinf(data)))
    if allow_negative is None:
        allow_negative = expression != "raw"
    if expression == "raw" or not allow_negative:
        kinds.append(("negative", data < 0))
    if expression == "raw" and data.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            kinds.append(("non-integer", np.isfinite(data) & (data != np.round(data))))
    found = [(k, m) for k, m in kinds if m.any()]
    if not found:
        return
    bad = np.logical_or.reduce([m for _, m in found])
    first = int(np.flatnonzero(bad)[0])
    kind = next(k for k, m in found if m[first])
    row, col = where(first)
    spot = str(obs_names[row]) if obs_names is not None and row < len(obs_names) else f"#{row}"
    gene = str(var_names[col]) if var_names is not None and col < len(var_names) else f"#{col}"
    tally = ", ".join(f"{int(m.sum()):,} {k}" for k, m in found)
    if expression == "raw":
        hint = "expected raw, non-negative integer counts"
        if [k for k, _ in found] == ["non-integer"]:
            hint += " (for normalised expression pass expression='normalized')"
    elif allow_negative:
        hint = "expected finite expression values"
    else:
        hint = "expected finite, non-negative expression values"
    raise InputError(
        f"{source}: {int(bad.sum()):,} invalid value(s) in the {what} ({tally}); the first is "
        f"{kind} ({float(data[first]):g}) at spot {spot!r}, gene {gene!r}; {hint}"
    )


def check_inside_image(
    spatial_px: np.ndarray, shape_hw: tuple[int, int], tolerance_px: float, where: str, fix: str
) -> None:
    """Fail when spot centres lie outside an image of ``shape_hw`` full-resolution pixels."""
    h, w = shape_hw
    xy = np.asarray(spatial_px, dtype=np.float64)
    bad = (
        (xy[:, 0] < -tolerance_px)
        | (xy[:, 1] < -tolerance_px)
        | (xy[:, 0] > w - 1 + tolerance_px)
        | (xy[:, 1] > h - 1 + tolerance_px)
    )
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{where}: {int(bad.sum())} of {len(xy)} spot centres lie outside the image "
            f"({w} x {h} px), e.g. x={xy[i, 0]:.0f}, y={xy[i, 1]:.0f}; {fix}"
        )


def estimate_pixel_pitch(array_xy: np.ndarray, pixel_xy: np.ndarray) -> float:
    """Pixels per unit of ``array_xy``, robustly.

    Fits ``pixel = A @ array + b`` by least squares, drops outliers (residual above median +
    5 MAD) and refits; the pitch is ``sqrt(|det A|)``, insensitive to rotation and flips.
    Returns ``nan`` when the points are collinear or too few.
    """
    if len(array_xy) < 3:
        return float("nan")
    a = np.asarray(array_xy, dtype=np.float64)
    p = np.asarray(pixel_xy, dtype=np.float64)
    keep = np.ones(len(a), dtype=bool)
    A = None
    for _ in range(3):
        design = np.column_stack([a[keep], np.ones(keep.sum())])
        A, _, rank, _ = np.linalg.lstsq(design, p[keep], rcond=None)
        if rank < 3:
            return float("nan")
        res = np.linalg.norm(np.column_stack([a, np.ones(len(a))]) @ A - p, axis=1)
        mad = np.median(np.abs(res[keep] - np.median(res[keep]))) + 1e-9
        new = res <= np.median(res[keep]) + 5.0 * 1.4826 * mad
        if new.sum() < 3 or (new == keep).all():
            break
        keep = new
    return float(np.sqrt(abs(np.linalg.det(A[:2, :2]))))
