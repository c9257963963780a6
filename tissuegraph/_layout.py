"""The AnnData layout of a slide: its key names and its one constructor.

Every slide tissuegraph hands out (the readers of :mod:`tissuegraph.io`, the simulator of
:mod:`tissuegraph.datasets`, :func:`tissuegraph.tl.pseudo_spots`) is built by
:func:`slide_anndata` and follows the scanpy / squidpy layout (``docs/io.md``):

============================================  =============================================
``X``                                         counts, ``csr_matrix`` float32, spots x genes
``var_names``, ``var[GENE_IDS]``              unique symbols; Ensembl ids (symbols for ST)
``obs[IN_TISSUE]``, ``[ARRAY_ROW]``, ``[ARRAY_COL]``  int64 lattice coordinates
``obsm[SPATIAL]``                             float64 ``[N, 2]`` centres in full-res pixels
``obsm[SPATIAL_UM]``                          the same in µm
``uns[SPATIAL][library_id]``                  ``IMAGES``, ``SCALEFACTORS``, ``METADATA``
``uns[TISSUEGRAPH]``                          :data:`TISSUEGRAPH_KEYS` (scale and origin)
============================================  =============================================

Nothing but the standard library at import time (numpy, pandas, scipy and anndata are
imported by the functions), so every layer, and the CLI, may import the constants.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tissuegraph.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

# obsm
SPATIAL = "spatial"  # full-resolution pixels (squidpy's key)
SPATIAL_UM = "spatial_um"  # micrometres
EMBEDDING = "X_tissuegraph"  # tl.embed's default key_added
# obs
IN_TISSUE = "in_tissue"
ARRAY_ROW = "array_row"
ARRAY_COL = "array_col"
# var
GENE_IDS = "gene_ids"
# uns[SPATIAL][library_id] (squidpy's layout)
IMAGES = "images"
SCALEFACTORS = "scalefactors"
METADATA = "metadata"
# uns[TISSUEGRAPH]
TISSUEGRAPH = "tissuegraph"
LIBRARY_ID = "library_id"
PLATFORM = "platform"
MICRONS_PER_PIXEL = "microns_per_pixel"
SPOT_DIAMETER_UM = "spot_diameter_um"
SPOT_SPACING_UM = "spot_spacing_um"
GRID = "grid"
IMAGE_PATH = "image_path"
SOURCE = "source"
EXPRESSION = "expression"  # optional: "raw" or "normalized" (what X holds)
TISSUEGRAPH_KEYS = (
    LIBRARY_ID,
    PLATFORM,
    MICRONS_PER_PIXEL,
    SPOT_DIAMETER_UM,
    SPOT_SPACING_UM,
    GRID,
    IMAGE_PATH,
    SOURCE,
)


def make_unique(names: pd.Index | list[str], join: str = "-") -> pd.Index:
    """Make names unique like ``scanpy``/``anndata``'s ``var_names_make_unique``.

    The first occurrence keeps its name; later duplicates get ``-1``, ``-2``, ... appended,
    skipping suffixes that would collide with an existing name.
    """
    import pandas as pd

    names = pd.Index([str(n) for n in names])
    if names.is_unique:
        return names
    seen = set(names)
    out = list(names)
    counts: dict[str, int] = {}
    first: set[str] = set()
    for i, name in enumerate(names):
        if name not in first:
            first.add(name)
            continue
        k = counts.get(name, 0)
        while True:
            k += 1
            cand = f"{name}{join}{k}"
            if cand not in seen:
                break
        counts[name] = k
        seen.add(cand)
        out[i] = cand
    return pd.Index(out)


def to_csr_float32(x) -> sp.csr_matrix:
    """Counts as a ``csr_matrix`` of float32 with sorted indices."""
    import numpy as np
    import scipy.sparse as sp

    m = sp.csr_matrix(x, dtype=np.float32)
    m.sum_duplicates()
    m.sort_indices()
    return m


def slide_anndata(
    X,
    *,
    obs_names,
    var_names,
    gene_ids,
    in_tissue,
    array_row,
    array_col,
    spatial_px: np.ndarray,
    microns_per_pixel: float,
    library_id: str,
    platform: str,
    spot_diameter_um: float,
    spot_spacing_um: float,
    grid: str,
    image_path: str | None,
    source: str,
    images: dict[str, np.ndarray],
    scalefactors: dict[str, float],
    metadata: dict[str, Any] | None = None,
    extra_obs: pd.DataFrame | None = None,
    extra_var: pd.DataFrame | None = None,
    spatial_um: np.ndarray | None = None,
    allow_no_genes: bool = False,
):
    """A slide's AnnData in the tissuegraph layout (see the module docstring).

    ``X`` becomes a float32 CSR matrix with sorted indices; ``var_names`` are made unique
    (:func:`make_unique`). ``spatial_um`` defaults to ``spatial_px * microns_per_pixel``
    (pass it when the µm coordinates are the primary ones). ``extra_obs`` / ``extra_var``
    columns (dtypes kept) follow the layout's own. Zero spots, or zero genes unless
    ``allow_no_genes``, raise an :class:`InputError` naming ``source``.
    """
    import anndata as ad
    import numpy as np
    import pandas as pd

    X = to_csr_float32(X)
    if X.shape[1] == 0 and not allow_no_genes:
        raise InputError(f"{source}: zero genes were read; check the feature table of this slide")
    if X.shape[0] == 0:
        raise InputError(f"{source}: zero spots were read; check the barcodes / spot table")
    obs = pd.DataFrame(index=pd.Index([str(b) for b in obs_names]))
    obs[IN_TISSUE] = np.broadcast_to(np.asarray(in_tissue, dtype=np.int64), (len(obs),)).copy()
    obs[ARRAY_ROW] = np.asarray(array_row, dtype=np.int64)
    obs[ARRAY_COL] = np.asarray(array_col, dtype=np.int64)
    if extra_obs is not None:
        for c in extra_obs.columns:
            obs[c] = extra_obs[c].array
    var_names = make_unique(var_names)
    var = pd.DataFrame(index=var_names)
    var[GENE_IDS] = pd.Index([str(g) for g in gene_ids]).to_numpy(dtype=object)
    if extra_var is not None:
        for c in extra_var.columns:
            var[c] = extra_var[c].array
    adata = ad.AnnData(X=X, obs=obs, var=var)
    spatial_px = np.asarray(spatial_px, dtype=np.float64)
    adata.obsm[SPATIAL] = spatial_px
    adata.obsm[SPATIAL_UM] = (
        spatial_px * float(microns_per_pixel)
        if spatial_um is None
        else np.asarray(spatial_um, dtype=np.float64)
    )
    adata.uns[SPATIAL] = {
        library_id: {
            IMAGES: dict(images),
            SCALEFACTORS: {k: float(v) for k, v in scalefactors.items()},
            METADATA: dict(metadata or {}),
        }
    }
    adata.uns[TISSUEGRAPH] = {
        LIBRARY_ID: library_id,
        PLATFORM: platform,
        MICRONS_PER_PIXEL: float(microns_per_pixel),
        SPOT_DIAMETER_UM: float(spot_diameter_um),
        SPOT_SPACING_UM: float(spot_spacing_um),
        GRID: grid,
        IMAGE_PATH: None if image_path is None else str(image_path),
        SOURCE: str(source),
    }
    return adata
