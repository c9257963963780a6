"""Spatial spot graph on AnnData and the neighbourhood-aggregation baseline embedding."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from tissuegraph.errors import InputError
from tissuegraph.tl._core import (
    check_adata,
    check_choice,
    check_int,
    log_normalized,
    require_obsm,
    store_params,
)

CONN_KEY = "spatial_connectivities"
DIST_KEY = "spatial_distances"


def _coords_um(adata) -> tuple[np.ndarray, str]:
    """Spot centres in µm when known (``obsm['spatial_um']``), else ``obsm['spatial']`` (px)."""
    if "spatial_um" in adata.obsm:
        return np.asarray(adata.obsm["spatial_um"], dtype=np.float64), "um"
    if "spatial" in adata.obsm:
        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        mpp = (adata.uns.get("tissuegraph") or {}).get("microns_per_pixel")
        if mpp:
            return xy * float(mpp), "um"
        return xy, "px"
    raise InputError(
        "spatial_neighbors: obsm['spatial'] not found: read the slide with tissuegraph.io "
        "(spot centres are needed)"
    )


def _nn_spacing(xy: np.ndarray) -> float:
    from sklearn.neighbors import NearestNeighbors

    k = min(2, xy.shape[0])
    d, _ = NearestNeighbors(n_neighbors=k).fit(xy).kneighbors(xy)
    d = d[:, -1]
    d = d[d > 0]
    if d.size == 0:
        raise InputError("spatial_neighbors: all spot centres coincide")
    return float(np.median(d))


def spatial_neighbors(
    adata,
    *,
    method: str = "grid",
    rings: int = 1,
    k: int = 6,
    radius: float | None = None,
    copy: bool = False,
):
    """Spot adjacency for squidpy-style spatial statistics.

    ``grid`` connects each spot to the lattice rings around it: spots within
    ``(rings + 0.25) x`` the lattice spacing (estimated as the median nearest-neighbour
    distance, so 6 neighbours per ring on Visium's hexagonal lattice and 4 on a square
    ST lattice). ``knn`` uses the ``k`` nearest spots (symmetrised), ``radius`` all
    spots within ``radius`` (in µm when ``obsm['spatial_um']`` or the pixel size is known,
    else in pixels).

    Parameters
    ----------
    adata
        AnnData with ``obsm['spatial']`` (and ideally ``obsm['spatial_um']``).
    method
        ``"grid"``, ``"knn"`` or ``"radius"``.
    rings, k, radius
        Size of the neighbourhood for each method.
    copy
        Return a modified copy instead of writing in place.

    Returns
    -------
    Writes ``obsp['spatial_connectivities']`` (binary, symmetric CSR ``[N, N]``),
    ``obsp['spatial_distances']`` (same pattern, distances) and
    ``uns['spatial_neighbors']`` (squidpy's keys + ``params``). ``None`` or the copy.
    """
    func = "spatial_neighbors"
    check_adata(adata, func)
    check_choice(method, "method", ("grid", "knn", "radius"), func)
    adata = adata.copy() if copy else adata
    xy, unit = _coords_um(adata)
    n = xy.shape[0]
    from sklearn.neighbors import NearestNeighbors

    if method == "knn":
        k = check_int(k, "k", func)
        kk = min(k + 1, n)
        dist, idx = NearestNeighbors(n_neighbors=kk).fit(xy).kneighbors(xy)
        rows = np.repeat(np.arange(n), kk)
        d = sp.csr_matrix((dist.ravel(), (rows, idx.ravel())), shape=(n, n))
        d = d.maximum(d.T).tocsr()
    else:
        if method == "grid":
            rings = check_int(rings, "rings", func)
            r = (rings + 0.25) * _nn_spacing(xy) if n > 1 else 1.0
        else:
            if radius is None or not radius > 0:
                raise InputError(f"{func}: method='radius' needs radius > 0, got {radius!r}")
            r = float(radius)
        d = NearestNeighbors(radius=r).fit(xy).radius_neighbors_graph(xy, mode="distance")
        d = d.tocsr()
    d.setdiag(0)
    d.eliminate_zeros()
    # keep coincident spots connected: distances of exactly 0 were dropped above
    d.sort_indices()
    conn = d.copy()
    conn.data = np.ones_like(conn.data, dtype=np.float32)
    adata.obsp[CONN_KEY] = conn.astype(np.float32)
    adata.obsp[DIST_KEY] = d.astype(np.float64)
    params = {"method": method, "rings": rings, "k": k, "radius": r if method != "knn" else None}
    params["unit"] = unit
    store_params(
        adata,
        "spatial_neighbors",
        params,
        connectivities_key=CONN_KEY,
        distances_key=DIST_KEY,
    )
    return adata if copy else None


def ensure_spatial_graph(adata, connectivity_key: str = CONN_KEY) -> sp.csr_matrix:
    """``obsp[connectivity_key]``, building the default grid graph when it is absent."""
    if connectivity_key not in adata.obsp:
        if connectivity_key != CONN_KEY:
            raise InputError(
                f"obsp[{connectivity_key!r}] not found: run tissuegraph.tl.spatial_neighbors "
                "or squidpy.gr.spatial_neighbors first"
            )
        spatial_neighbors(adata)
    a = sp.csr_matrix(adata.obsp[connectivity_key])
    if a.shape != (adata.n_obs, adata.n_obs):
        raise InputError(f"obsp[{connectivity_key!r}] must be [n_obs, n_obs]")
    return a


def hop_rings(adj: sp.csr_matrix, n_hops: int) -> list[sp.csr_matrix]:
    """Row-normalised matrices averaging over the spots exactly ``1..n_hops`` hops away."""
    n = adj.shape[0]
    a = (adj > 0).astype(np.float32).tocsr()
    a.setdiag(0)
    a.eliminate_zeros()
    reached = sp.identity(n, format="csr", dtype=np.float32)
    frontier = reached
    out = []
    for _ in range(n_hops):
        nxt = (frontier @ a).tocsr()
        nxt.data[:] = 1.0
        ring = nxt - nxt.multiply(reached)
        ring.eliminate_zeros()
        ring = (ring > 0).astype(np.float32).tocsr()
        reached = ((reached + ring) > 0).astype(np.float32).tocsr()
        frontier = ring
        deg = np.asarray(ring.sum(axis=1)).ravel()
        inv = np.divide(1.0, deg, out=np.zeros_like(deg), where=deg > 0)
        out.append((sp.diags(inv) @ ring).tocsr())
    return out


def expression_pca(
    adata, *, n_pcs: int = 30, n_top_genes: int | None = 2000, random_state: int = 0
) -> np.ndarray:
    """PCA of expression without touching ``adata``: library-size normalisation + ``log1p``,
    the ``n_top_genes`` most variable genes (scanpy's ``seurat`` flavour; all genes when
    ``None`` or fewer), centred (not scaled: rare genes of single spots would dominate), and
    ``n_pcs`` components.

    Returns float ``[N, n_pcs]``.
    """
    from sklearn.decomposition import PCA

    x = log_normalized(adata)
    keep = np.asarray((x > 0).sum(axis=0)).ravel() >= 3
    x = x[:, keep]
    if n_top_genes is not None and x.shape[1] > n_top_genes:
        import scanpy as sc
        from anndata import AnnData

        tmp = AnnData(x)
        sc.pp.highly_variable_genes(tmp, n_top_genes=int(n_top_genes), flavor="seurat")
        x = x[:, np.flatnonzero(tmp.var["highly_variable"].to_numpy())]
    n_comp = int(min(n_pcs, x.shape[1] - 1, x.shape[0] - 1))
    if n_comp < 1:
        raise InputError("aggregate_neighbors: too few genes or spots for PCA")
    xd = x.toarray()
    xd -= xd.mean(axis=0, keepdims=True)
    return PCA(
        n_components=n_comp, svd_solver="randomized", random_state=random_state
    ).fit_transform(xd)


def aggregate_neighbors(
    adata,
    *,
    n_hops: int = 3,
    use_rep: str | None = None,
    n_pcs: int = 30,
    n_top_genes: int | None = 2000,
    connectivity_key: str = CONN_KEY,
    key_added: str = "X_aggregated",
    random_state: int = 0,
    copy: bool = False,
):
    """Neighbourhood-aggregated spot features (a CellCharter-style baseline).

    Each spot's representation is concatenated with its mean over the spots exactly
    ``1, 2, ..., n_hops`` hops away on the spatial graph: ``[x_i, mean_{ring 1} x, ...,
    mean_{ring k} x]``. With ``use_rep=None`` the representation is the first ``n_pcs``
    principal components of the ``n_top_genes`` most variable log-normalised genes
    (computed on a copy; see :func:`expression_pca`).

    Parameters
    ----------
    adata
        AnnData with a spatial graph (built with :func:`spatial_neighbors` if absent).
    n_hops
        Number of hop rings to aggregate (0 returns the representation itself).
    use_rep
        obsm key of the representation, or ``None`` for PCA of expression.
    n_pcs, n_top_genes
        Principal components and highly variable genes when ``use_rep`` is ``None``.
    connectivity_key
        obsp key of the spatial graph.
    key_added
        obsm key written.

    Returns
    -------
    Writes ``obsm[key_added]`` (float32 ``[N, D * (n_hops + 1)]``), ``uns[key_added]``
    (``params``) and, when no graph existed, the outputs of :func:`spatial_neighbors`.
    """
    func = "aggregate_neighbors"
    check_adata(adata, func)
    n_hops = check_int(n_hops, "n_hops", func, minimum=0)
    adata = adata.copy() if copy else adata
    if use_rep is None:
        rep = expression_pca(adata, n_pcs=n_pcs, n_top_genes=n_top_genes, random_state=random_state)
    else:
        rep = require_obsm(adata, use_rep, func)
    adj = ensure_spatial_graph(adata, connectivity_key)
    blocks = [rep] + [r @ rep for r in hop_rings(adj, n_hops)]
    adata.obsm[key_added] = np.hstack(blocks).astype(np.float32)
    store_params(
        adata,
        key_added,
        {
            "n_hops": n_hops,
            "use_rep": use_rep,
            "n_pcs": n_pcs,
            "n_top_genes": n_top_genes,
            "connectivity_key": connectivity_key,
        },
    )
    return adata if copy else None
