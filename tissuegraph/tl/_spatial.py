"""Spatial spot graph on AnnData and the neighbourhood-aggregation baseline embedding."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from tissuegraph import _layout as L
from tissuegraph.errors import InputError
from tissuegraph.tl._core import (
    check_adata,
    check_choice,
    check_int,
    log_normalized,
    require_obsm,
    store_params,
)

#: squidpy's default key of the spatial graph: ``obsp[f"{SPATIAL_KEY}_connectivities"]``,
#: ``obsp[f"{SPATIAL_KEY}_distances"]``, ``uns[f"{SPATIAL_KEY}_neighbors"]``
SPATIAL_KEY = "spatial"
CONN_KEY = f"{SPATIAL_KEY}_connectivities"
DIST_KEY = f"{SPATIAL_KEY}_distances"
METHODS = ("grid", "knn", "radius", "delaunay")


def spot_coords(adata, func: str = "spatial_neighbors") -> tuple[np.ndarray, str]:
    """Spot centres and their unit: µm when known (``obsm['spatial_um']``, or
    ``obsm['spatial']`` with a pixel size from ``uns['tissuegraph']`` or the standard
    scale factors), else ``obsm['spatial']`` in pixels."""
    from tissuegraph.graph.coords import positions_um

    try:
        return positions_um(adata, func=func), "um"
    except InputError:
        if L.SPATIAL not in adata.obsm:
            raise InputError(
                f"{func}: obsm['spatial'] not found: spot centres are needed (read the slide "
                "with tissuegraph.io or scanpy / squidpy)"
            ) from None
        return np.asarray(adata.obsm[L.SPATIAL], dtype=np.float64)[:, :2], "px"


def _nn_spacing(xy: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=min(2, xy.shape[0]))
    d = np.atleast_2d(d)[:, -1]
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
    square_neighbors: int = 4,
    key_added: str = SPATIAL_KEY,
    copy: bool = False,
):
    """Spot adjacency in squidpy's layout, built by :func:`tissuegraph.graph.spatial.spot_graph`
    (the same builder as the graphs of ``build-graphs``).

    ``grid`` connects each spot to the lattice rings around it from its array coordinates
    (``obs['array_row'/'array_col']``): 6 neighbours per ring on Visium's hexagonal
    lattice, 4 (or 8, ``square_neighbors``) on a square ST / Visium HD lattice; this is
    squidpy's ``coord_type="grid"`` graph. Without array coordinates ``grid`` takes the
    spots within ``(rings + 0.25) x`` the lattice spacing (the median nearest-neighbour
    distance). ``knn`` uses the ``k`` nearest spots (symmetrised), ``radius`` all spots
    within ``radius``, ``delaunay`` the Delaunay triangulation without its long hull edges.
    Lengths are in µm when the pixel size is known (``obsm['spatial_um']``,
    ``uns['tissuegraph']`` or the standard Visium scale factors), else in pixels.

    Parameters
    ----------
    adata
        AnnData with ``obsm['spatial']`` (tissuegraph's readers, scanpy's or squidpy's).
    method
        ``"grid"``, ``"knn"``, ``"radius"`` or ``"delaunay"``.
    rings, k, radius, square_neighbors
        Size of the neighbourhood for each method.
    key_added
        Prefix of the keys written (squidpy's default ``"spatial"``).
    copy
        Return a modified copy instead of writing in place.

    Returns
    -------
    Writes ``obsp[f'{key_added}_connectivities']`` (binary, symmetric CSR float32
    ``[N, N]``, no self loops), ``obsp[f'{key_added}_distances']`` (same pattern, edge
    lengths) and ``uns[f'{key_added}_neighbors']`` (squidpy's ``connectivities_key``,
    ``distances_key`` and ``params``). ``None`` or the copy.
    """
    from tissuegraph.errors import ConfigError
    from tissuegraph.graph.coords import array_rc, grid_kind
    from tissuegraph.graph.spatial import spot_graph

    func = "spatial_neighbors"
    check_adata(adata, func)
    check_choice(method, "method", METHODS, func)
    rings = check_int(rings, "rings", func)
    k = check_int(k, "k", func)
    if square_neighbors not in (4, 8):
        raise InputError(f"{func}: square_neighbors must be 4 or 8, got {square_neighbors!r}")
    if method == "radius" and (radius is None or not radius > 0):
        raise InputError(f"{func}: method='radius' needs radius > 0, got {radius!r}")
    adata = adata.copy() if copy else adata
    xy, unit = spot_coords(adata, func)
    n = xy.shape[0]
    rc = array_rc(adata) if method == "grid" else None
    kw: dict = {"method": method, "k": k, "rings": rings, "square_neighbors": square_neighbors}
    lattice = None
    if method == "grid" and rc is not None:
        lattice = grid_kind(adata, rc)
        kw.update(array_rc=rc, grid=lattice)
    elif method == "grid":  # no lattice coordinates: rings of the measured spacing
        r = (rings + 0.25) * _nn_spacing(xy) if n > 1 else 1.0
        kw.update(method="radius", radius_um=r)
    elif method == "radius":
        kw["radius_um"] = float(radius)
    try:
        ei, dist = spot_graph(xy, **kw)
    except ConfigError as exc:
        raise InputError(f"{func}: {exc}") from None
    d = sp.csr_matrix((dist.astype(np.float64), (ei[0], ei[1])), shape=(n, n))
    d.sort_indices()
    conn = sp.csr_matrix((np.ones(ei.shape[1], dtype=np.float32), (ei[0], ei[1])), shape=(n, n))
    conn.sort_indices()
    conn_key, dist_key = f"{key_added}_connectivities", f"{key_added}_distances"
    adata.obsp[conn_key] = conn
    adata.obsp[dist_key] = d
    params = {
        "method": method,
        "rings": rings if method == "grid" else None,
        "k": k if method == "knn" else None,
        "radius": kw.get("radius_um"),
        "lattice": lattice,
        "square_neighbors": square_neighbors if lattice == "square" else None,
        "unit": unit,
    }
    store_params(
        adata,
        f"{key_added}_neighbors",
        params,
        connectivities_key=conn_key,
        distances_key=dist_key,
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
