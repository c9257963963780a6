"""Neighbourhood enrichment between niches: vectorised permutation test on the spot graph."""

from __future__ import annotations

import numpy as np

from tissuegraph.errors import InputError
from tissuegraph.tl._core import (
    check_adata,
    check_choice,
    check_int,
    label_codes,
    require_obs,
    store_params,
)
from tissuegraph.tl._spatial import CONN_KEY, ensure_spatial_graph


def _falling(n: np.ndarray, m: int) -> float:
    out = 1.0
    for t in range(m):
        out *= n - t
    return out


def exact_moments(
    codes: np.ndarray, degrees: np.ndarray, n_edges: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and standard deviation of the pair counts under label permutation.

    For a binary, symmetric graph without self-loops with ``n_edges`` directed edges and
    out-degrees ``degrees``, ``T_ab = sum_{(i,j) in E} [l_i = a][l_j = b]`` has, over all
    permutations of the labels (class sizes ``n_a`` fixed),

    ``E[T_ab] = |E| P(a, b)`` and
    ``E[T_ab^2] = |E| P(a,b) + d_ab |E| P(a,a) + S (P(a,b,b) + P(a,a,b))
    + 2 d_ab S P(a,a,a) + (|E|^2 - 2|E| - 4S) P(a,b,a,b)``,

    where ``S = sum_i deg_i (deg_i - 1)`` counts ordered edge pairs sharing one node,
    ``d_ab`` is Kronecker's delta and ``P(c_1, ..., c_m)`` is the probability that ``m``
    given distinct spots carry labels ``c_1..c_m`` (a ratio of falling factorials). These
    are the limits of the permutation estimates as the number of permutations grows.
    """
    n = float(codes.size)
    sizes = np.bincount(codes, minlength=k).astype(np.float64)
    e = float(n_edges)
    s = float(np.sum(degrees.astype(np.float64) * (degrees - 1.0)))

    def prob(*labels):
        num = 1.0
        seen: dict[int, int] = {}
        for c in labels:
            num *= sizes[c] - seen.get(c, 0)
            seen[c] = seen.get(c, 0) + 1
        den = _falling(n, len(labels))
        return num / den if den > 0 else 0.0

    mean = np.zeros((k, k))
    std = np.zeros((k, k))
    for a in range(k):
        for b in range(k):
            same = 1.0 if a == b else 0.0
            pab = prob(a, b)
            m1 = e * pab
            m2 = (
                e * pab
                + same * e * prob(a, a)
                + s * (prob(a, b, b) + prob(a, a, b))
                + 2.0 * same * s * prob(a, a, a)
                + (e * e - 2.0 * e - 4.0 * s) * prob(a, b, a, b)
            )
            mean[a, b] = m1
            std[a, b] = np.sqrt(max(m2 - m1 * m1, 0.0))
    return mean, std


def _pair_counts(codes: np.ndarray, row: np.ndarray, col: np.ndarray, k: int) -> np.ndarray:
    """``count[a, b]`` = number of directed edges from a spot of cluster a to one of b."""
    idx = codes[row] * k + codes[col]
    return np.bincount(idx, minlength=k * k).reshape(k, k).astype(np.float64)


def nhood_enrichment(
    adata,
    *,
    cluster_key: str,
    n_perms: int = 1000,
    seed: int = 0,
    method: str = "auto",
    connectivity_key: str = CONN_KEY,
    batch_size: int | None = None,
    copy: bool = False,
):
    """Neighbourhood enrichment z-scores between clusters (niches) on the spatial graph.

    ``count[a, b]`` is the number of graph edges from a spot of cluster ``a`` to a spot
    of cluster ``b``; ``zscore = (count - mean) / std`` over random permutations of the
    cluster labels, as in ``squidpy.gr.nhood_enrichment``.

    - ``method="permutation"``: ``n_perms`` label permutations; all permutations of a batch
      are counted with one ``bincount`` over the (upper-triangle) edges.
    - ``method="exact"``: the exact mean and standard deviation of the permutation
      distribution in closed form (:func:`exact_moments`), i.e. the limit of infinitely
      many permutations: no sampling noise, ``O(|E| + K^2)`` time. Needs a binary,
      symmetric graph without self-loops (what :func:`spatial_neighbors` and squidpy build).
    - ``method="auto"`` (default): ``exact`` when the graph allows it, else ``permutation``.

    Parameters
    ----------
    adata
        AnnData with ``obs[cluster_key]``; the spatial graph ``obsp[connectivity_key]``
        is built with :func:`spatial_neighbors` when absent.
    cluster_key
        obs column of the cluster labels (e.g. ``"tg_niche"``).
    n_perms
        Number of label permutations (``permutation`` method).
    seed
        Seed of the permutations.
    method
        ``"auto"``, ``"exact"`` or ``"permutation"``.
    connectivity_key
        obsp key of the spot adjacency (squidpy's default name). Edge weights are ignored
        (an edge counts once), as in squidpy.
    batch_size
        Permutations per vectorised batch (default: about 20 M edge visits per batch).

    Returns
    -------
    Writes ``uns[f"{cluster_key}_nhood_enrichment"]`` = ``{"zscore": float [K, K],
    "count": uint32 [K, K], "params": {...}}`` (squidpy's layout, so ``squidpy.pl``
    plots it), and the spatial graph when it was absent. ``None``, or the copy.
    """
    func = "nhood_enrichment"
    check_adata(adata, func)
    check_choice(method, "method", ("auto", "exact", "permutation"), func)
    n_perms = check_int(n_perms, "n_perms", func, minimum=2)
    labels = require_obs(adata, cluster_key, func, "tissuegraph.tl.niches")
    adata = adata.copy() if copy else adata
    codes, cats = label_codes(labels)
    if (codes < 0).any():
        raise InputError(f"{func}: obs[{cluster_key!r}] has missing labels; drop or fill them")
    adj = ensure_spatial_graph(adata, connectivity_key).tocsr()
    adj.sum_duplicates()
    binary = (adj != 0).astype(np.int8).tocsr()
    symmetric = (binary != binary.T).nnz == 0
    no_loops = binary.diagonal().sum() == 0
    if method == "exact" and not (symmetric and no_loops):
        raise InputError(
            f"{func}: method='exact' needs a symmetric graph without self-loops in "
            f"obsp[{connectivity_key!r}]; use method='permutation'"
        )
    use_exact = method == "exact" or (method == "auto" and symmetric and no_loops)
    coo = binary.tocoo()
    row, col = coo.row.astype(np.int64), coo.col.astype(np.int64)
    k = len(cats)
    count = _pair_counts(codes, row, col, k)
    if use_exact:
        degrees = np.diff(binary.indptr)
        mean, std = exact_moments(codes, degrees, row.size, k)
    else:
        mean, std = _permutation_moments(codes, row, col, k, symmetric, n_perms, seed, batch_size)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (count - mean) / std
    key = f"{cluster_key}_nhood_enrichment"
    store_params(
        adata,
        key,
        {
            "cluster_key": cluster_key,
            "method": "exact" if use_exact else "permutation",
            "n_perms": n_perms,
            "seed": seed,
            "connectivity_key": connectivity_key,
        },
        zscore=z,
        count=count.astype(np.uint32),
    )
    return adata if copy else None


def _permutation_moments(codes, row, col, k, symmetric, n_perms, seed, batch_size):
    """Monte-Carlo mean/std of the pair counts over ``n_perms`` label permutations."""
    if symmetric:  # count the upper triangle; the full count is U + U^T
        keep = row < col
        row, col = row[keep], col[keep]
    n = codes.size
    small = codes.astype(np.uint8 if k < 256 else np.int32)
    e = max(row.size, 1)
    if batch_size is None:
        batch_size = max(1, min(n_perms, 20_000_000 // e))
    rng = np.random.default_rng(seed)
    s1 = np.zeros((k, k))
    s2 = np.zeros((k, k))
    done = 0
    row32, col32 = row.astype(np.intp), col.astype(np.intp)
    while done < n_perms:
        b = min(batch_size, n_perms - done)
        perm = rng.permuted(np.broadcast_to(small, (b, n)), axis=1)
        offs = (np.arange(b, dtype=np.int64) * (k * k))[:, None]
        idx = perm[:, row32].astype(np.int64) * k + perm[:, col32] + offs
        c = np.bincount(idx.ravel(), minlength=b * k * k).reshape(b, k, k).astype(np.float64)
        if symmetric:
            c = c + c.transpose(0, 2, 1)
        s1 += c.sum(0)
        s2 += (c * c).sum(0)
        done += b
    mean = s1 / n_perms
    std = np.sqrt(np.maximum(s2 / n_perms - mean * mean, 0.0))
    return mean, std
