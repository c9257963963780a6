"""Spot centres in µm from an AnnData in tissuegraph's or the standard scverse layout.

tissuegraph's readers store ``obsm["spatial_um"]`` and ``uns["tissuegraph"]["microns_per_pixel"]``.
An AnnData from another reader (scanpy's / squidpy's Visium readers, spatialdata-io, a
converted h5ad) has only the standard keys: ``obsm["spatial"]`` in full-resolution pixels and
``uns["spatial"][library_id]["scalefactors"]`` (Space Ranger's ``scalefactors_json.json``).
The pixel size is then derived from the standard keys:

- Visium HD (Space Ranger >= 3): ``microns_per_pixel`` of the scale factors;
- Visium with its lattice (``obs["array_row"/"array_col"]``): the fitted pitch of the spot
  lattice in pixels, 100 µm centre to centre (as tissuegraph's reader does: exact, while
  ``spot_diameter_fullres`` is drawn for display and can be off by 10-30 %);
- otherwise ``55 / spot_diameter_fullres`` (a Visium spot is 55 µm wide), or
  ``bin_size_um / spot_diameter_fullres`` for Visium HD bins.

Only mappings are read here (``obsm``, ``uns``): no anndata, no torch.
"""

from __future__ import annotations

import numpy as np

from tissuegraph import _layout as L
from tissuegraph.errors import InputError

__all__ = [
    "VISIUM_SPACING_UM",
    "VISIUM_SPOT_UM",
    "array_rc",
    "grid_kind",
    "library_scalefactors",
    "microns_per_pixel",
    "positions_um",
]

#: diameter of a Visium spot in µm
VISIUM_SPOT_UM = 55.0
#: centre-to-centre distance of neighbouring Visium spots in µm
VISIUM_SPACING_UM = 100.0


def _positive(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) and f > 0 else None


def library_scalefactors(adata, library_id: str | None = None) -> dict:
    """The ``scalefactors`` of one library of ``uns["spatial"]`` (``{}`` when absent).

    The library is ``library_id``, else ``uns["tissuegraph"]["library_id"]``, else the only
    library. Several libraries and none named: ``{}``, unless all their scale factors agree.
    """
    spatial = adata.uns.get(L.SPATIAL) or {}
    if not hasattr(spatial, "get"):
        return {}
    lib = library_id or (adata.uns.get(L.TISSUEGRAPH) or {}).get(L.LIBRARY_ID)
    if lib is not None and lib in spatial:
        return dict((spatial[lib] or {}).get("scalefactors") or {})
    found = [
        dict((e or {}).get("scalefactors") or {}) for e in spatial.values() if hasattr(e, "get")
    ]
    found = [f for f in found if f]
    if not found:
        return {}
    mpps = {_from_scalefactors(f) for f in found}
    return found[0] if len(found) == 1 or len(mpps) == 1 else {}


def _from_scalefactors(sf: dict) -> float | None:
    mpp = _positive(sf.get("microns_per_pixel"))
    if mpp:
        return mpp
    diam = _positive(sf.get("spot_diameter_fullres"))
    if not diam:
        return None
    bin_um = _positive(sf.get("bin_size_um"))
    return (bin_um or VISIUM_SPOT_UM) / diam


def _visium_lattice_mpp(adata) -> float | None:
    """µm per pixel from the fit of pixel centres to Visium's hexagonal lattice (``None``
    without lattice coordinates, off a hexagonal lattice, or with too few spots)."""
    rc = array_rc(adata)
    if rc is None or L.SPATIAL not in adata.obsm or len(rc) < 3:
        return None
    if grid_kind(adata, rc) != "hex":
        return None
    from tissuegraph.io._common import estimate_pixel_pitch

    px = np.asarray(adata.obsm[L.SPATIAL], dtype=np.float64)[:, :2]
    sel = np.arange(len(rc))
    if len(sel) > 200_000:
        sel = np.random.default_rng(0).choice(len(sel), 200_000, replace=False)
    step = VISIUM_SPACING_UM / 2.0  # doubled columns: 2 steps per spot along a row
    lat_um = np.stack([rc[sel, 1] * step, rc[sel, 0] * step * np.sqrt(3.0)], axis=1)
    pitch = estimate_pixel_pitch(lat_um, px[sel])  # px per µm
    return 1.0 / pitch if np.isfinite(pitch) and pitch > 0 else None


def microns_per_pixel(adata, library_id: str | None = None) -> float | None:
    """µm per full-resolution pixel: ``uns["tissuegraph"]["microns_per_pixel"]`` when set,
    else derived from the standard layout (see the module docstring); ``None`` when
    nothing gives it."""
    mpp = _positive((adata.uns.get(L.TISSUEGRAPH) or {}).get(L.MICRONS_PER_PIXEL))
    if mpp:
        return mpp
    sf = library_scalefactors(adata, library_id)
    mpp = _positive(sf.get("microns_per_pixel"))
    if mpp:
        return mpp
    if sf and not _positive(sf.get("bin_size_um")):
        mpp = _visium_lattice_mpp(adata)
        if mpp:
            return mpp
    return _from_scalefactors(sf)


def positions_um(adata, *, func: str | None = None) -> np.ndarray:
    """Spot centres ``float64 [N, 2]`` in µm: ``obsm["spatial_um"]``, else
    ``obsm["spatial"]`` (full-resolution px) times :func:`microns_per_pixel`.

    Raises :class:`~tissuegraph.errors.InputError` (prefixed with ``func``) when neither
    gives µm.
    """
    if L.SPATIAL_UM in adata.obsm:
        return np.asarray(adata.obsm[L.SPATIAL_UM], dtype=np.float64)
    mpp = microns_per_pixel(adata)
    if L.SPATIAL in adata.obsm and mpp:
        return np.asarray(adata.obsm[L.SPATIAL], dtype=np.float64)[:, :2] * mpp
    where = f"{func}: " if func else ""
    what = "obsm['spatial']" if L.SPATIAL not in adata.obsm else "the pixel size"
    raise InputError(
        f"{where}spot positions in µm unknown: {what} is missing (give obsm['spatial_um'], or "
        "obsm['spatial'] in full-resolution pixels with uns['spatial'][library_id]"
        "['scalefactors'] (spot_diameter_fullres or microns_per_pixel) or "
        "uns['tissuegraph']['microns_per_pixel'])"
    )


def array_rc(adata) -> np.ndarray | None:
    """Lattice coordinates ``int64 [N, 2]`` (``obs["array_row"]``, ``obs["array_col"]``), or
    ``None`` when the slide has none."""
    if "array_row" in adata.obs and "array_col" in adata.obs:
        return np.stack(
            [np.asarray(adata.obs["array_row"]), np.asarray(adata.obs["array_col"])], axis=1
        ).astype(np.int64)
    return None


def grid_kind(adata, rc: np.ndarray | None) -> str:
    """``"hex"`` or ``"square"``: ``uns["tissuegraph"]["grid"]`` when set, else ``"hex"``
    when every spot has the same parity of ``row + col`` (Visium's doubled coordinates)."""
    g = (adata.uns.get(L.TISSUEGRAPH) or {}).get(L.GRID)
    if g in ("hex", "square"):
        return g
    if rc is not None and len(rc) and len(np.unique((rc[:, 0] + rc[:, 1]) % 2)) == 1:
        return "hex"
    return "square"
