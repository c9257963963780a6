"""Niches: clustering of spot embeddings, with the number of niches chosen by stability."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from tissuegraph import _layout as L
from tissuegraph.errors import InputError
from tissuegraph.tl._core import (
    EMBED_KEY,
    NICHE_KEY,
    category_colors,
    check_adata,
    check_choice,
    check_int,
    require_obsm,
    store_params,
)

METHODS = ("gmm", "kmeans", "leiden")
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def prepare_representation(
    x: np.ndarray, n_pcs: int | None, random_state: int = 0, scale: bool = True
) -> np.ndarray:
    """Centre (and with ``scale`` standardise) each feature, then keep ``n_pcs`` principal
    components when the representation is wider than that."""
    x = x - x.mean(axis=0, keepdims=True)
    if scale:
        sd = x.std(axis=0, keepdims=True)
        x = x / np.where(sd > 0, sd, 1.0)
    if n_pcs is not None and x.shape[1] > n_pcs and x.shape[0] > n_pcs:
        from sklearn.decomposition import PCA

        x = PCA(
            n_components=n_pcs, svd_solver="randomized", random_state=random_state
        ).fit_transform(x)
    return x


def _fit_labels(x, k, method, *, n_init, covariance_type, random_state, fit_idx=None):
    """Fit one clustering with ``k`` clusters on ``x[fit_idx]`` and label every row of ``x``.

    Small problems run with single-threaded BLAS: the many tiny matrix products of EM are
    much slower with threads on a busy machine.
    """
    from threadpoolctl import threadpool_limits

    xf = x if fit_idx is None else x[fit_idx]
    if xf.shape[0] * xf.shape[1] < 20_000_000:
        with threadpool_limits(limits=1):
            return _fit_labels_inner(xf, x, k, method, n_init, covariance_type, random_state)
    return _fit_labels_inner(xf, x, k, method, n_init, covariance_type, random_state)


def _fit_labels_inner(xf, x, k, method, n_init, covariance_type, random_state):
    if method == "kmeans":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=n_init, random_state=random_state).fit(xf)
        return km.predict(x)
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(
        n_components=k,
        covariance_type=covariance_type,
        n_init=n_init,
        init_params="kmeans",
        reg_covar=1e-4,
        max_iter=300,
        random_state=random_state,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning of single restarts
        gm.fit(xf)
    return gm.predict(x)


def stability_curve(
    x: np.ndarray,
    k_range: tuple[int, int],
    method: str = "gmm",
    *,
    n_repeats: int = 5,
    subsample: float = 0.8,
    max_spots: int = 5000,
    covariance_type: str = "tied",
    random_state: int = 0,
) -> pd.DataFrame:
    """Cluster stability for each K (as CellCharter's automatic K selection).

    For each repeat a random ``subsample`` of spots is clustered with K-1, K and K+1
    clusters (one restart each, new seed) and every spot is labelled. The stability of K
    is the mean adjusted Rand index (ARI) between the K-clustering and the K-1 and K+1
    clusterings of the same repeat: a K that reflects real structure is one that
    neighbouring K agree with. ``restart_ari`` is the mean ARI between repeats at K.

    Returns a DataFrame with columns ``k``, ``stability``, ``stability_std``,
    ``restart_ari``.
    """
    from sklearn.metrics import adjusted_rand_score as ari

    rng = np.random.default_rng(random_state)
    kmin, kmax = k_range
    n = x.shape[0]
    eval_idx = np.sort(rng.choice(n, size=min(n, max_spots), replace=False))
    xe = x[eval_idx]
    ks = list(range(max(kmin - 1, 1), kmax + 2))
    labels: dict[tuple[int, int], np.ndarray] = {}
    for r in range(n_repeats):
        fit_idx = np.sort(rng.choice(xe.shape[0], size=max(int(subsample * xe.shape[0]), 2)))
        for k in ks:
            if k == 1:
                labels[(r, k)] = np.zeros(xe.shape[0], dtype=int)
                continue
            labels[(r, k)] = _fit_labels(
                xe,
                k,
                method,
                n_init=1,
                covariance_type=covariance_type,
                random_state=int(rng.integers(2**31 - 1)),
                fit_idx=fit_idx,
            )
    rows = []
    for k in range(kmin, kmax + 1):
        per = []
        for r in range(n_repeats):
            s = [ari(labels[(r, k)], labels[(r, k2)]) for k2 in (k - 1, k + 1) if (r, k2) in labels]
            per.append(np.mean(s))
        rest = [
            ari(labels[(r1, k)], labels[(r2, k)])
            for r1 in range(n_repeats)
            for r2 in range(r1 + 1, n_repeats)
        ]
        rows.append(
            {
                "k": k,
                "stability": float(np.mean(per)),
                "stability_std": float(np.std(per)),
                "restart_ari": float(np.mean(rest)) if rest else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def _leiden_labels(x, n_niches, resolution, random_state, n_neighbors=15):
    """Leiden (scanpy's ``flavor="igraph"``) on a symmetrised ``n_neighbors``-NN graph of
    ``x``; with ``n_niches`` the resolution is bisected (log scale) towards that count."""
    import scanpy as sc
    from anndata import AnnData
    from sklearn.neighbors import kneighbors_graph

    g = kneighbors_graph(x, n_neighbors=min(n_neighbors, x.shape[0] - 1), include_self=False)
    g = ((g + g.T) > 0).astype(np.float64).tocsr()
    tmp = AnnData(obs=pd.DataFrame(index=pd.RangeIndex(x.shape[0]).astype(str)))

    def run(res):
        sc.tl.leiden(
            tmp,
            resolution=float(res),
            random_state=random_state,
            adjacency=g,
            flavor="igraph",
            directed=False,
            n_iterations=-1,
            key_added="_l",
        )
        return tmp.obs["_l"].cat.codes.to_numpy().astype(int)

    algorithm = "leiden (igraph)"
    if n_niches is None:
        return run(resolution), float(resolution), algorithm
    lo, hi = 0.01, 5.0
    best = None
    for _ in range(20):
        res = np.sqrt(lo * hi)
        lab = run(res)
        k = len(np.unique(lab))
        if best is None or abs(k - n_niches) < abs(best[2] - n_niches):
            best = (lab, res, k)
        if k == n_niches:
            break
        if k < n_niches:
            lo = res
        else:
            hi = res
    return best[0], float(best[1]), algorithm


def refine_labels(codes: np.ndarray, pos: np.ndarray, k: int) -> np.ndarray:
    """One round of spatial majority voting (GraphST's optional refinement).

    Each spot takes the most frequent label among itself and its neighbours on the
    symmetrised ``k``-nearest-spot graph (:func:`tissuegraph.graph.spatial.spot_graph`,
    ``method="knn"``); a tie keeps the spot's own label when it is among the most
    frequent, else the smallest label. Unlabelled spots (``-1``) neither vote nor change.

    Returns the new ``int`` codes.
    """
    import scipy.sparse as sp

    from tissuegraph.graph.spatial import spot_graph

    codes = np.asarray(codes, dtype=np.int64)
    n = codes.shape[0]
    ei, _ = spot_graph(pos, method="knn", k=int(k))
    ok = codes >= 0
    n_lab = int(codes.max()) + 1 if ok.any() else 0
    if n_lab == 0:
        return codes.copy()
    onehot = sp.csr_matrix(
        (np.ones(int(ok.sum())), (np.flatnonzero(ok), codes[ok])), shape=(n, n_lab)
    )
    adj = sp.csr_matrix((np.ones(ei.shape[1]), (ei[0], ei[1])), shape=(n, n))
    votes = np.asarray((adj @ onehot + onehot).todense())
    top = votes.max(axis=1, keepdims=True)
    winner = np.argmax(votes == top, axis=1)  # smallest of the tied labels
    own = np.where(ok, codes, 0)
    keep_own = ok & (votes[np.arange(n), own] == top[:, 0])
    out = np.where(keep_own, codes, winner)
    return np.where(ok, out, codes)


def _rep_list(use_rep, func: str) -> list[str]:
    """``use_rep`` as a non-empty list of distinct obsm keys."""
    if isinstance(use_rep, str):
        return [use_rep]
    reps = list(use_rep) if isinstance(use_rep, list | tuple) else None
    if not reps or not all(isinstance(r, str) for r in reps):
        raise InputError(f"{func}: use_rep must be an obsm key or a non-empty list of keys")
    if len(set(reps)) != len(reps):
        raise InputError(f"{func}: use_rep lists a key twice: {reps}")
    return reps


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    uniq, counts = np.unique(labels, return_counts=True)
    order = uniq[np.argsort(-counts, kind="stable")]
    remap = {old: new for new, old in enumerate(order)}
    return np.array([remap[v] for v in labels], dtype=int)


def consensus_labels(partitions, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Majority vote of several partitions of the same spots into ``k`` clusters.

    The reference is the partition that agrees most with the others (highest mean adjusted
    Rand index); every partition's labels are matched to the reference's by maximum overlap
    (Hungarian assignment on the contingency table), then each spot takes the label most
    partitions give it, ties going to the reference. Linear in the number of spots (no
    spot-by-spot co-association matrix), so it scales to Visium HD.

    Returns ``(labels, support, pairwise_ari)``: labels in ``0..k-1``, the fraction of
    partitions that agree with each spot's label, and the partitions' pairwise ARI matrix.
    """
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score

    codes = [np.asarray(p, dtype=np.int64) for p in partitions]
    m = len(codes)
    if m == 0:
        raise ValueError("consensus_labels needs at least one partition")
    n = codes[0].shape[0]
    if any(c.shape != (n,) for c in codes) or any(c.min() < 0 or c.max() >= k for c in codes):
        raise ValueError(
            f"partitions must be label vectors of one length with values in 0..{k - 1}"
        )
    ari = np.eye(m)
    for i in range(m):
        for j in range(i + 1, m):
            ari[i, j] = ari[j, i] = adjusted_rand_score(codes[i], codes[j])
    ref = codes[int(np.argmax(ari.sum(1)))]
    votes = np.zeros((n, k))
    rows = np.arange(n)
    for c in codes:
        table = np.zeros((k, k))
        np.add.at(table, (c, ref), 1)
        src, dst = linear_sum_assignment(-table)
        mapping = np.empty(k, dtype=np.int64)
        mapping[src] = dst
        votes[rows, mapping[c]] += 1.0
    votes[rows, ref] += 0.5  # ties go to the reference; never outweighs a whole vote
    labels = votes.argmax(1)
    support = np.floor(votes[rows, labels]) / m
    return labels, support, ari


def niches(
    adata,
    *,
    n_niches: int | None = None,
    method: str = "gmm",
    use_rep: str | Sequence[str] = EMBED_KEY,
    key_added: str = NICHE_KEY,
    n_init: int = 10,
    covariance_type: str = "tied",
    scale: bool | None = None,
    n_pcs: int | None = 50,
    k_range: tuple[int, int] = (2, 10),
    n_repeats: int = 5,
    resolution: float = 1.0,
    refine: int = 0,
    random_state: int = 0,
    copy: bool = False,
):
    """Cluster spot embeddings into niches.

    The representation ``obsm[use_rep]`` is centred, optionally standardised per feature
    (``scale``), and reduced to ``n_pcs`` principal components (when wider). By default
    (``scale=None``) an embedding written by :func:`embed` follows its record
    ``uns[use_rep]['scale_for_clustering']``: standardised when a LayerNorm shapes its
    features (their scales carry no meaning), only centred for the norm-free, linear-input
    GCN of the DLPFC recipe, whose feature variances are signal. On DLPFC
    (``benchmarks/domains_dlpfc.py``, 5 seeds) that embedding clusters 151673 / 151674 to
    0.594 / 0.581 unscaled vs 0.597 / 0.551 scaled (seed sd on 151674 0.027 vs 0.047). Any
    other representation is standardised unless ``scale=False`` is given; which is better
    depends on how it was made: the benchmark's PCA + aggregation (scaled HVG panel, 30 PCs)
    gives 0.583 / 0.577 unscaled vs 0.520 / 0.602 scaled, while :func:`aggregate_neighbors`
    on its defaults clusters 151673 better scaled (about 0.53 vs 0.39).

    ``gmm`` fits a Gaussian mixture with one shared full covariance (``covariance_type="tied"``, R mclust's EEE, as CellCharter)
    from ``n_init`` k-means initialisations, keeping the best likelihood: a single start
    makes the result swing by about 0.1 ARI. ``kmeans`` is k-means with ``n_init``
    restarts; ``leiden`` clusters a 15-NN graph of the representation with scanpy's
    ``sc.tl.leiden(flavor="igraph")`` (the resolution is searched to give ``n_niches``
    when that is set).

    With ``n_niches=None`` (``gmm``/``kmeans``) K is chosen in ``k_range`` as the most
    stable number of clusters over ``n_repeats`` subsampled restarts (see
    :func:`stability_curve`); the curve is kept in ``uns[key_added]['stability']``.

    ``use_rep`` may list several representations of the same spots, typically the
    embeddings of models pretrained with different seeds: each is clustered on its own
    (representation ``i`` with seed ``random_state + i``, K chosen on the first when
    ``n_niches`` is ``None``) and the niches are their majority vote after matching labels
    (:func:`consensus_labels`). Single models of the DLPFC recipe vary with the seed (151674:
    ARI 0.44-0.63 over ten seeds); the vote of five models is steadier and higher
    (``benchmarks/domains_dlpfc.py``, method ``tissuegraph_consensus``). ``gmm`` and
    ``kmeans`` only.

    ``refine=k`` (off by default) adds a spatially smoothed copy of the labels, as GraphST
    offers: one majority vote of each spot with its neighbours on the symmetrised
    ``k``-nearest-spot graph (:func:`refine_labels`). It is written beside the clustering,
    never over it, so both can be reported.

    Parameters
    ----------
    adata
        AnnData with ``obsm[use_rep]`` (from :func:`embed` or :func:`aggregate_neighbors`).
    n_niches
        Number of niches, or ``None`` to choose it.
    method
        ``"gmm"``, ``"kmeans"`` or ``"leiden"``.
    use_rep
        obsm key of the representation, or a list of keys for a consensus of several.
    key_added
        obs key of the labels.
    n_init
        Restarts of the final fit.
    covariance_type
        GaussianMixture covariance (``"tied"``, ``"full"``, ``"diag"``, ``"spherical"``).
    scale
        Standardise each feature before clustering; ``None`` (default): as recorded by
        :func:`embed` for ``use_rep``, else ``True`` (see above).
    n_pcs
        Principal components kept after standardisation (``None``: all features).
    k_range
        Smallest and largest K considered when ``n_niches`` is ``None``.
    n_repeats
        Subsampled restarts per K for the stability curve.
    resolution
        Leiden resolution when ``n_niches`` is ``None``.
    refine
        ``0``: no refinement; ``k >= 1``: also write the labels after a majority vote over
        each spot's ``k`` nearest spots (needs ``obsm['spatial']``).
    random_state
        Seed.

    Returns
    -------
    Writes ``obs[key_added]`` (categorical, ``"0"`` = largest niche),
    ``uns[f"{key_added}_colors"]`` (one colour per niche, scanpy's convention; kept when
    it already holds enough valid colours) and ``uns[key_added]`` (``params``,
    ``n_niches``, ``stability``: a dict of lists ``k``, ``stability``, ``stability_std``,
    ``restart_ari`` when K was chosen; ``resolution`` and ``algorithm`` for Leiden).
    With ``refine``: ``obs[f"{key_added}_refined"]`` (same categories),
    ``uns[f"{key_added}_refined_colors"]`` (the same colours) and
    ``uns[key_added]["refined"]`` (``key``, ``k``, ``n_changed``, ``fraction_changed``).
    With a list of representations: ``obs[f"{key_added}_support"]`` (the fraction of them
    that agree with each spot's niche) and ``uns[key_added]["consensus"]`` (``use_rep``,
    ``pairwise_ari``: the mean ARI between their clusterings, ``support_mean``).
    ``None``, or the copy.
    """
    func = "niches"
    check_adata(adata, func)
    check_choice(method, "method", METHODS, func)
    check_choice(covariance_type, "covariance_type", COVARIANCE_TYPES, func)
    n_init = check_int(n_init, "n_init", func)
    if n_niches is not None:
        n_niches = check_int(n_niches, "n_niches", func)
        if n_niches > adata.n_obs:
            raise InputError(f"{func}: n_niches={n_niches} exceeds the {adata.n_obs} spots")
    if n_pcs is not None:
        n_pcs = check_int(n_pcs, "n_pcs", func)
    refine = check_int(refine, "refine", func, minimum=0)
    if refine and L.SPATIAL not in adata.obsm and L.SPATIAL_UM not in adata.obsm:
        raise InputError(f"{func}: refine needs spot positions (obsm['spatial'])")
    reps = _rep_list(use_rep, func)
    if len(reps) > 1 and method == "leiden":
        raise InputError(
            f"{func}: a consensus of several use_rep needs method='gmm' or 'kmeans' (one K for "
            "all of them), not 'leiden'"
        )
    kmin, kmax = (int(k) for k in k_range)
    if not 2 <= kmin <= kmax:
        raise InputError(f"{func}: k_range must be (kmin, kmax) with 2 <= kmin <= kmax")
    xs, scales = [], []
    for rep in reps:
        producer = "tissuegraph.tl.embed" if rep == EMBED_KEY else None
        x = require_obsm(adata, rep, func, producer)
        sc = scale
        if sc is None:
            rec = adata.uns.get(rep)
            sc = bool(rec.get("scale_for_clustering", True)) if hasattr(rec, "get") else True
        xs.append(x)
        scales.append(bool(sc))
    scale = scales[0] if len(set(scales)) == 1 else scales
    adata = adata.copy() if copy else adata
    xr = prepare_representation(xs[0], n_pcs, random_state, scale=scales[0])
    extra: dict = {}
    support = None
    if method == "leiden":
        labels, res, algorithm = _leiden_labels(xr, n_niches, resolution, random_state)
        extra["resolution"] = res
        extra["algorithm"] = algorithm
    else:
        k = n_niches
        if k is None:
            kmax_eff = min(kmax, adata.n_obs - 2)
            curve = stability_curve(
                xr,
                (kmin, max(kmin, kmax_eff)),
                method,
                n_repeats=n_repeats,
                covariance_type=covariance_type,
                random_state=random_state,
            )
            k = int(curve["k"].iloc[int(np.argmax(curve["stability"].to_numpy()))])
            extra["stability"] = {c: curve[c].tolist() for c in curve.columns}
        labels = _fit_labels(
            xr,
            k,
            method,
            n_init=n_init,
            covariance_type=covariance_type,
            random_state=random_state,
        )
        if len(reps) > 1:
            parts = [labels]
            for i in range(1, len(reps)):
                xi = prepare_representation(xs[i], n_pcs, random_state + i, scale=scales[i])
                parts.append(
                    _fit_labels(
                        xi,
                        k,
                        method,
                        n_init=n_init,
                        covariance_type=covariance_type,
                        random_state=random_state + i,
                    )
                )
            labels, support, ari = consensus_labels(parts, k)
            off = ari[~np.eye(len(parts), dtype=bool)]
            extra["consensus"] = {
                "use_rep": list(reps),
                "pairwise_ari": float(off.mean()),
                "support_mean": float(support.mean()),
            }
    labels = _relabel_by_size(labels)
    n_found = int(labels.max()) + 1
    cats = [str(i) for i in range(n_found)]
    adata.obs[key_added] = pd.Categorical([str(v) for v in labels], categories=cats)
    skey = f"{key_added}_support"
    if support is not None:
        adata.obs[skey] = support.astype(np.float32)
    elif "consensus" in (adata.uns.get(key_added) or {}):  # support of an earlier consensus
        adata.obs.drop(columns=[skey], errors="ignore", inplace=True)
    colors = category_colors(adata, key_added)
    rkey = f"{key_added}_refined"
    previous = (adata.uns.get(key_added) or {}).get("refined") or {}
    if not refine and previous.get("key") == rkey:  # refined labels of an earlier run: stale
        adata.obs.drop(columns=[rkey], errors="ignore", inplace=True)
        adata.uns.pop(f"{rkey}_colors", None)
    if refine:
        from tissuegraph.tl._spatial import spot_coords

        pos, _ = spot_coords(adata, func)
        refined = refine_labels(labels, pos, refine)
        adata.obs[rkey] = pd.Categorical([str(v) for v in refined], categories=cats)
        adata.uns[f"{rkey}_colors"] = list(colors)
        n_changed = int((refined != labels).sum())
        extra["refined"] = {
            "key": rkey,
            "k": refine,
            "n_changed": n_changed,
            "fraction_changed": n_changed / max(len(labels), 1),
        }
    store_params(
        adata,
        key_added,
        {
            "n_niches": n_niches,
            "method": method,
            "use_rep": reps[0] if len(reps) == 1 else list(reps),
            "n_init": n_init,
            "covariance_type": covariance_type,
            "scale": scale,
            "n_pcs": n_pcs,
            "k_range": [kmin, kmax],
            "n_repeats": n_repeats,
            "resolution": resolution,
            "refine": refine,
            "random_state": random_state,
        },
        n_niches=n_found,
        **extra,
    )
    return adata if copy else None
