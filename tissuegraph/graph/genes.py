"""Gene panel, normalisation and ``(spot, expresses, gene)`` edges (numpy / scipy only)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from tissuegraph._genes import match_positions
from tissuegraph.errors import ConfigError, InputError

__all__ = [
    "NORMALIZE_METHODS",
    "HVG_FLAVORS",
    "as_csr",
    "normalize_counts",
    "panel_matrix",
    "highly_variable_rank",
    "select_hvg",
    "topk_per_row",
]

NORMALIZE_METHODS = ("log1p_cp10k", "log1p", "none")
HVG_FLAVORS = ("seurat_v3", "dispersion")


def as_csr(x) -> sp.csr_matrix:
    """``float32`` CSR copy-free when possible."""
    if sp.issparse(x):
        m = x.tocsr()
    else:
        m = sp.csr_matrix(np.asarray(x))
    if m.dtype != np.float32:
        m = m.astype(np.float32)
    return m


def normalize_counts(x, method: str = "log1p_cp10k", target_sum: float = 1e4) -> sp.csr_matrix:
    """Normalise a spots x genes count matrix (rows = spots).

    ``log1p_cp10k``: scale every spot to ``target_sum`` counts, then ``log1p``; spots with
    no counts stay zero. ``log1p``: ``log1p`` of raw counts. ``none``: unchanged.

    Returns a new ``float32`` CSR matrix with the same sparsity pattern (sharing the index
    arrays of ``x``; treat them as read-only).
    """
    if method not in NORMALIZE_METHODS:
        raise ConfigError(
            f"normalize.method={method!r} is unknown: choose one of {', '.join(NORMALIZE_METHODS)}"
        )
    src = as_csr(x)
    if not src.has_canonical_format:  # duplicate or unsorted entries: work on a clean copy
        src = src.copy()
        src.sum_duplicates()
    if method == "none":
        return src.copy()
    if method == "log1p_cp10k":
        totals = np.asarray(src.sum(1)).ravel().astype(np.float64)
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        data = src.data * np.repeat(scale.astype(np.float32), np.diff(src.indptr))
    else:
        data = src.data.copy()
    np.log1p(data, out=data)
    # new values, same sparsity structure: the index arrays are shared, not copied
    return sp.csr_matrix((data, src.indices, src.indptr), shape=src.shape, copy=False)


def panel_matrix(x: sp.csr_matrix, var_names, genes: list[str]) -> tuple[sp.csr_matrix, list[str]]:
    """Columns of ``x`` in panel order; panel genes absent from ``var_names`` become zeros.

    Genes are matched exactly first (the last of repeated ``var_names`` wins), then
    case-insensitively (the first wins): :func:`tissuegraph._genes.match_positions`.
    Returns the ``[N, G]`` CSR matrix and the list of missing panel genes.
    """
    cols = np.asarray(match_positions(genes, var_names, exact_wins="last"), dtype=np.int64)
    missing = [g for g, i in zip(genes, cols) if i < 0]
    present = np.nonzero(cols >= 0)[0]
    if len(present) == len(genes) and np.array_equal(cols, np.arange(x.shape[1])):
        return x, missing  # the panel is the slide's gene list, in order
    if len(present) == 0:
        return sp.csr_matrix((x.shape[0], len(genes)), dtype=np.float32), missing
    sub = x[:, cols[present]].tocsr()
    if len(present) < len(genes):  # re-map columns to their panel position
        sub = sp.csr_matrix(
            (sub.data, present[sub.indices], sub.indptr), shape=(x.shape[0], len(genes))
        )
    sub.sort_indices()
    out = sub
    return out, missing


def _mean_var(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[0]
    mean = np.asarray(x.sum(0)).ravel() / n
    sq = x.copy()
    sq.data = sq.data.astype(np.float64) ** 2
    ex2 = np.asarray(sq.sum(0)).ravel() / n
    var = np.maximum(ex2 - mean**2, 0.0) * (n / max(n - 1, 1))
    return mean, var


def _trend(logm: np.ndarray, logv: np.ndarray, n_bins: int = 40) -> np.ndarray:
    """Smooth log-variance trend over log-mean: medians in quantile bins, interpolated."""
    if len(logm) < 4:
        return np.full_like(logv, np.median(logv) if len(logv) else 0.0)
    edges = np.unique(np.quantile(logm, np.linspace(0, 1, n_bins + 1)))
    which = np.clip(np.searchsorted(edges, logm, side="right") - 1, 0, len(edges) - 2)
    cx, cy = [], []
    for b in np.unique(which):  # loop over <= n_bins bins, not genes
        sel = which == b
        cx.append(np.median(logm[sel]))
        cy.append(np.median(logv[sel]))
    cx, cy = np.asarray(cx), np.asarray(cy)
    order = np.argsort(cx)
    return np.interp(logm, cx[order], cy[order])


def highly_variable_rank(
    counts: sp.csr_matrix, flavor: str = "seurat_v3", target_sum: float = 1e4
) -> np.ndarray:
    """Variability score of every gene of one slide (higher = more variable).

    ``seurat_v3``: regress log10 variance on log10 mean of the raw counts (binned-median
    trend), standardise each gene by the trend's expected sd, clip values at ``sqrt(N)``
    and take the variance of the standardised values. ``dispersion``: dispersion
    (variance / mean) of log1p-cp10k data, z-scored within 20 mean bins.
    """
    x = as_csr(counts)
    n = x.shape[0]
    if flavor == "seurat_v3":
        mean, var = _mean_var(x)
        ok = (mean > 0) & (var > 0)
        score = np.zeros(x.shape[1])
        if not ok.any():
            return score
        logm = np.log10(mean[ok])
        logv = np.log10(var[ok])
        exp_sd = np.sqrt(10 ** _trend(logm, logv))
        sd = np.zeros(x.shape[1])
        sd[ok] = exp_sd
        clip = np.sqrt(n)
        mu = mean
        # standardised value z = (x - mu) / sd, clipped at sqrt(N); zeros contribute
        # (-mu/sd)^2 each, nonzeros are computed on the sparse data
        coo = x.tocoo()
        col = coo.col
        with np.errstate(divide="ignore", invalid="ignore"):
            z_nz = np.minimum((coo.data - mu[col]) / sd[col], clip)
            z0 = np.minimum(-mu / sd, clip)
        z_nz = np.where(np.isfinite(z_nz), z_nz, 0.0)
        z0 = np.where(np.isfinite(z0), z0, 0.0)
        nnz = np.bincount(col, minlength=x.shape[1])
        s1 = np.bincount(col, weights=z_nz, minlength=x.shape[1]) + (n - nnz) * z0
        s2 = np.bincount(col, weights=z_nz**2, minlength=x.shape[1]) + (n - nnz) * z0**2
        score = (s2 - s1**2 / n) / max(n - 1, 1)
        score[~ok] = 0.0
        return score
    if flavor == "dispersion":
        xn = normalize_counts(x, "log1p_cp10k", target_sum)
        mean, var = _mean_var(xn)
        with np.errstate(divide="ignore", invalid="ignore"):
            disp = np.log(np.where(mean > 0, var / mean, np.nan))
        score = np.zeros(x.shape[1])
        ok = np.isfinite(disp)
        if not ok.any():
            return score
        edges = np.unique(np.quantile(mean[ok], np.linspace(0, 1, 21)))
        which = np.clip(np.searchsorted(edges, mean[ok], side="right") - 1, 0, len(edges) - 2)
        d = disp[ok]
        cnt = np.bincount(which)
        mu_b = np.bincount(which, weights=d) / np.maximum(cnt, 1)
        sd_b = np.sqrt(np.bincount(which, weights=d**2) / np.maximum(cnt, 1) - mu_b**2)
        sd_b = np.where(sd_b > 0, sd_b, 1.0)
        score[ok] = (d - mu_b[which]) / sd_b[which]
        score[~ok] = -np.inf
        return score
    raise ConfigError(f"panel.flavor={flavor!r} is unknown: choose one of {', '.join(HVG_FLAVORS)}")


def select_hvg(
    slides: dict[str, tuple[sp.csr_matrix, list[str]]],
    n_top: int,
    *,
    flavor: str = "seurat_v3",
    min_spots: int = 3,
) -> list[str]:
    """Highly variable genes shared by several slides.

    Parameters
    ----------
    slides
        ``name -> (raw counts [N, G_s], gene symbols)``.
    n_top
        Panel size.

    Candidates are the genes present in every slide (case-insensitive) and detected in at
    least ``min_spots`` spots of each. Genes are ranked per slide by
    :func:`highly_variable_rank`; like scanpy's ``seurat_v3`` with ``batch_key``, genes are
    ordered by the number of slides in which they are among the per-slide top ``n_top``
    (descending), then by their median rank, and the first ``n_top`` are kept. Symbols
    are those of the first slide; the returned order is the ranking order.
    """
    if not slides:
        raise InputError("no slides to choose the gene panel from")
    common: dict[str, str] | None = None
    per = []
    for name, (x, genes) in slides.items():
        x = as_csr(x)
        detected = np.asarray((x > 0).sum(0)).ravel()
        up = {}
        for g, d in zip(genes, detected):
            if d >= min_spots:
                up.setdefault(str(g).upper(), str(g))
        per.append((name, x, [str(g).upper() for g in genes]))
        common = up if common is None else {k: v for k, v in common.items() if k in up}
    assert common is not None
    if not common:
        raise InputError(
            f"no gene is detected in >= {min_spots} spots of every slide in "
            f"{sorted(slides)}; lower panel.min_spots or use panel.mode=list"
        )
    cand = sorted(common)
    cidx = {g: i for i, g in enumerate(cand)}
    ranks = np.zeros((len(per), len(cand)))
    for s, (_, x, genes_up) in enumerate(per):
        score = highly_variable_rank(x, flavor)
        col = np.full(len(cand), -1)
        for j, g in enumerate(genes_up):
            i = cidx.get(g)
            if i is not None and col[i] < 0:
                col[i] = j
        sc = score[col]
        order = np.argsort(-sc, kind="stable")
        r = np.empty(len(cand))
        r[order] = np.arange(len(cand))
        ranks[s] = r
    med = np.median(ranks, axis=0)
    n_in_top = (ranks < n_top).sum(0)
    order = np.lexsort((np.arange(len(cand)), med, -n_in_top))
    chosen = order[: min(n_top, len(cand))]
    return [common[cand[i]] for i in chosen]


def row_block(x: sp.csr_matrix, a: int, b: int) -> np.ndarray:
    """Rows ``a:b`` of a CSR matrix as a dense ``float32`` array (no intermediate CSR copy)."""
    lo, hi = int(x.indptr[a]), int(x.indptr[b])
    out = np.zeros((b - a, x.shape[1]), dtype=np.float32)
    rows = np.repeat(np.arange(b - a), np.diff(x.indptr[a : b + 1]))
    out[rows, x.indices[lo:hi]] = x.data[lo:hi]
    return out


def topk_per_row(
    x: sp.csr_matrix, k: int, *, chunk_elems: int = 1 << 24
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` largest nonzero entries of every row (``k = 0``: all nonzero).

    Rows are processed in dense chunks of about ``chunk_elems`` values with
    ``np.argpartition`` (no Python loop over rows). Ties at the k-th value are broken
    arbitrarily but deterministically.

    Returns
    -------
    rows, cols
        ``int64 [E]``, sorted by row then column.
    values
        ``float32 [E]``.
    """
    x = as_csr(x)  # never modified in place (its arrays may be shared)
    n, g = x.shape
    if k <= 0 or k >= g:
        xs = x if x.has_sorted_indices else x.sorted_indices()
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(xs.indptr))
        keep = xs.data > 0
        return (
            rows[keep],
            xs.indices[keep].astype(np.int64),
            xs.data[keep].astype(np.float32),
        )
    rows_out, cols_out, vals_out = [], [], []
    step = max(1, chunk_elems // max(g, 1))
    for a in range(0, n, step):
        b = min(n, a + step)
        dense = row_block(x, a, b)
        part = np.argpartition(dense, g - k, axis=1)[:, g - k :]
        part.sort(axis=1)  # column order within each row
        vals = np.take_along_axis(dense, part, axis=1)
        keep = vals > 0
        rows_out.append(np.nonzero(keep)[0] + a)
        cols_out.append(part[keep])
        vals_out.append(vals[keep])
    rows = np.concatenate(rows_out).astype(np.int64, copy=False)
    cols = np.concatenate(cols_out).astype(np.int64, copy=False)
    vals = np.concatenate(vals_out).astype(np.float32, copy=False)
    return rows, cols, vals
