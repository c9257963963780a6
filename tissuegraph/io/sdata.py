"""SpatialData <-> AnnData in tissuegraph's layout (the ``tissuegraph[spatialdata]`` extra).

A SpatialData object keeps the expression table, the spot shapes and the images as separate
elements, each with its transformation to a coordinate system. tissuegraph's readers and
:mod:`tissuegraph.tl` work on one AnnData in the squidpy layout (``obsm["spatial"]`` in
full-resolution pixels, ``uns["spatial"][library_id]`` with ``images`` and
``scalefactors``). :func:`read_spatialdata` builds that AnnData from a table, the shapes it
annotates and one image; :func:`to_spatialdata` goes back, as spatialdata-io lays out a
Visium slide: the coordinate system ``"global"`` is the full-resolution pixel grid, spots are
circles with their diameter in those pixels, the ``hires`` / ``lowres`` images are scaled into
it.

``spatialdata`` is imported only when these functions run.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd

from tissuegraph import _layout as L
from tissuegraph.errors import InputError, require

__all__ = ["is_spatialdata", "read_spatialdata", "table_key_of", "to_spatialdata"]

#: largest side (pixels) of an image that read_spatialdata attaches without an image_key:
#: a Space Ranger hires image is 2,000 (CytAssist 4,000); a whole-slide image is far larger
MAX_DEFAULT_IMAGE_PX = 10_000
#: columns that link the table to its shapes, named as spatialdata-io's Visium reader does
REGION_KEY = "region"
INSTANCE_KEY = "spot_id"


def is_spatialdata(obj) -> bool:
    """Whether ``obj`` is a ``spatialdata.SpatialData`` (checked without importing it)."""
    t = type(obj)
    return t.__name__ == "SpatialData" and t.__module__.split(".")[0] == "spatialdata"


def _spatialdata(func: str):
    return require("spatialdata", "spatialdata", func)


def _pick(kind: str, keys, key: str | None, func: str) -> str | None:
    keys = [str(k) for k in keys]
    if key is not None:
        if key not in keys:
            present = ", ".join(keys) if keys else "none"
            raise InputError(f"{func}: {kind}_key={key!r} not found; {kind}s present: {present}")
        return key
    if len(keys) == 1:
        return keys[0]
    if not keys:
        return None
    raise InputError(
        f"{func}: the SpatialData has {len(keys)} {kind}s ({', '.join(keys)}); "
        f"choose one with {kind}_key="
    )


def table_key_of(sdata, table_key: str | None = None, func: str = "read_spatialdata") -> str:
    """The key of the table to use: ``table_key``, or the only table of ``sdata``."""
    key = _pick("table", sdata.tables.keys(), table_key, func)
    if key is None:
        raise InputError(f"{func}: the SpatialData has no table (expression of the spots)")
    return key


def _affine(element, cs: str, what: str, func: str) -> np.ndarray:
    """The 3x3 affine matrix (x, y) of ``element``'s transformation to ``cs``."""
    from spatialdata.transformations import get_transformation

    transforms = get_transformation(element, get_all=True) or {}
    if cs not in transforms:
        present = ", ".join(transforms) if transforms else "none"
        raise InputError(
            f"{func}: {what} has no transformation to the coordinate system {cs!r} "
            f"(it has: {present}); pass coordinate_system="
        )
    return np.asarray(
        transforms[cs].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")),
        dtype=np.float64,
    )


def _spots_from_shapes(sdata, table, cs: str, func: str):
    """Centres ``[N, 2]`` in ``cs`` and the spot diameter there, from the shapes the table
    annotates (rows in table order); ``None`` when the table annotates no shapes element."""
    attrs = table.uns.get("spatialdata_attrs") or {}
    region = attrs.get("region")
    if isinstance(region, (list, tuple, np.ndarray)):
        region = region[0] if len(region) == 1 else None
    if region is None or str(region) not in sdata.shapes:
        return None
    shapes = sdata.shapes[str(region)]
    instance_key = attrs.get("instance_key")
    if instance_key in table.obs:
        ids = table.obs[instance_key].to_numpy()
        missing = ~pd.Index(ids).isin(shapes.index)
        if missing.any():
            raise InputError(
                f"{func}: {int(missing.sum())} table rows have no shape in {region!r} "
                f"(obs[{instance_key!r}], e.g. {ids[np.flatnonzero(missing)[0]]!r})"
            )
        shapes = shapes.loc[ids]
    elif len(shapes) != table.n_obs:
        return None
    m = _affine(shapes, cs, f"shapes {region!r}", func)
    if "radius" in shapes:
        xy = np.stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()], axis=1)
        diameter = 2.0 * float(np.median(shapes["radius"].to_numpy(dtype=np.float64)))
    else:  # polygons (e.g. square bins): centroids, side of the equal-area square
        c = shapes.geometry.centroid
        xy = np.stack([c.x.to_numpy(), c.y.to_numpy()], axis=1)
        diameter = float(np.sqrt(np.median(shapes.geometry.area.to_numpy())))
    xy = xy.astype(np.float64) @ m[:2, :2].T + m[:2, 2]
    diameter *= float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    return xy, diameter


def _image_level0(element):
    """The full-resolution level of an image element (a DataArray or a multiscale tree)."""
    if hasattr(element, "dims") and "c" in getattr(element, "dims", ()):
        return element
    from spatialdata import get_pyramid_levels

    return get_pyramid_levels(element, n=0)


def _as_uint8_rgb(arr) -> np.ndarray:
    """``(c, y, x)`` image data -> ``uint8 [H, W, 3]``."""
    a = np.asarray(arr)
    a = a[:3] if a.shape[0] >= 3 else np.repeat(a[:1], 3, axis=0)
    a = np.moveaxis(a, 0, -1)
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    a = a.astype(np.float64)
    if a.size and np.nanmax(a) <= 1.0:
        a = a * 255.0
    return np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)


def _pick_image(sdata, image_key: str | None, cs: str, func: str):
    """``(key, uint8 [H, W, 3], pixels of the image per unit of cs)`` or ``None``."""
    if image_key is not None:
        _pick("image", sdata.images.keys(), image_key, func)
        keys = [image_key]
    else:
        from spatialdata.transformations import get_transformation

        keys = [
            str(k)
            for k, el in sdata.images.items()
            if cs in (get_transformation(el, get_all=True) or {})
        ]
    best = None
    for key in keys:
        level0 = _image_level0(sdata.images[key])
        h, w = int(level0.sizes["y"]), int(level0.sizes["x"])
        m = _affine(sdata.images[key], cs, f"image {key!r}", func)
        lin = m[:2, :2]
        sx, sy = float(np.hypot(*lin[:, 0])), float(np.hypot(*lin[:, 1]))
        if abs(lin[0, 1]) + abs(lin[1, 0]) > 1e-6 * max(sx, sy) or abs(sx - sy) > 1e-3 * sx:
            if image_key is None:
                continue
            raise InputError(
                f"{func}: image {key!r} is rotated, sheared or scaled unevenly in {cs!r}; "
                "only a uniform scaling is supported"
            )
        if np.abs(m[:2, 2]).max() > 0.5 * sx:
            if image_key is None:
                continue
            raise InputError(
                f"{func}: image {key!r} is translated by {m[:2, 2].tolist()} in {cs!r}; "
                "only a uniform scaling is supported"
            )
        if image_key is None and max(h, w) > MAX_DEFAULT_IMAGE_PX:
            continue
        scalef = 1.0 / sx
        if best is None or scalef > best[2]:
            best = (key, level0, scalef)
    if best is None:
        if image_key is None and keys:
            warnings.warn(
                f"{func}: no image attached (candidates {', '.join(keys)} are larger than "
                f"{MAX_DEFAULT_IMAGE_PX} px or not a uniform scaling); pass image_key=",
                stacklevel=3,
            )
        return None
    key, level0, scalef = best
    return key, _as_uint8_rgb(level0.transpose("c", "y", "x").values), scalef


def read_spatialdata(
    sdata,
    *,
    table_key: str | None = None,
    image_key: str | None = None,
    coordinate_system: str = "global",
    library_id: str | None = None,
):
    """One table of a SpatialData object as an AnnData in tissuegraph's layout.

    Parameters
    ----------
    sdata
        A ``spatialdata.SpatialData`` (e.g. from ``spatialdata_io.visium`` or
        :func:`to_spatialdata`).
    table_key
        Key in ``sdata.tables``; may be left out when there is one table.
    image_key
        Key in ``sdata.images`` of the H&E. By default the highest-resolution image with a
        transformation to ``coordinate_system`` that is a uniform scaling and at most
        10,000 px a side (a whole-slide image is not loaded unless named).
    coordinate_system
        The coordinate system of the full-resolution pixels (spatialdata-io: ``"global"``).
    library_id
        Key of ``uns["spatial"]``; default: ``uns["tissuegraph"]["library_id"]`` of the
        table, else the shapes element's name, else ``table_key``.

    Returns
    -------
    A new AnnData: the table's ``X``, ``obs``, ``var``, ``obsm``, ``obsp``, ``layers`` and
    ``uns`` (without ``spatialdata_attrs``); ``obsm["spatial"]``: the centres of the shapes
    the table annotates, in ``coordinate_system`` (else the table's own
    ``obsm["spatial"]``); ``uns["spatial"][library_id]``: ``images["hires"]`` (the image,
    uint8 ``[H, W, 3]``) and ``scalefactors`` (the table's, plus ``tissue_hires_scalef`` from
    the image's transformation and ``spot_diameter_fullres`` from the shapes when the table
    has none). µm per pixel then come from ``uns["tissuegraph"]``, the spot lattice
    (``obs["array_row"/"array_col"]``) or the spot diameter (``tissuegraph.graph.coords``).
    """
    func = "read_spatialdata"
    _spatialdata(func)
    if not is_spatialdata(sdata):
        raise InputError(f"{func}: expected a SpatialData, got {type(sdata).__name__}")
    key = table_key_of(sdata, table_key, func)
    table = sdata.tables[key]
    if table.n_obs == 0:
        raise InputError(f"{func}: table {key!r} has no rows")
    spots = _spots_from_shapes(sdata, table, coordinate_system, func)
    if spots is None and L.SPATIAL not in table.obsm:
        raise InputError(
            f"{func}: table {key!r} annotates no shapes element and has no obsm['spatial']: "
            "the spot positions are unknown"
        )
    region = (table.uns.get("spatialdata_attrs") or {}).get("region")
    adata = table.copy()
    adata.uns.pop("spatialdata_attrs", None)
    tg_uns = dict(adata.uns.get(L.TISSUEGRAPH) or {})
    lib = str(
        library_id or tg_uns.get(L.LIBRARY_ID) or (region if isinstance(region, str) else key)
    )
    if spots is not None:
        adata.obsm[L.SPATIAL] = spots[0]
    else:
        adata.obsm[L.SPATIAL] = np.asarray(table.obsm[L.SPATIAL], dtype=np.float64)[:, :2]
    old = dict((dict(adata.uns.get(L.SPATIAL) or {})).get(lib) or {})
    scalefactors = {k: v for k, v in dict(old.get("scalefactors") or {}).items()}
    images = {}
    if spots is not None and not scalefactors.get("spot_diameter_fullres"):
        scalefactors["spot_diameter_fullres"] = float(spots[1])
    picked = _pick_image(sdata, image_key, coordinate_system, func)
    if picked is not None:
        images["hires"] = picked[1]
        scalefactors["tissue_hires_scalef"] = float(picked[2])
    adata.uns[L.SPATIAL] = {
        lib: {
            "images": images,
            "scalefactors": scalefactors,
            "metadata": dict(old.get("metadata") or {}),
        }
    }
    if tg_uns:
        adata.uns[L.TISSUEGRAPH] = {**tg_uns, L.LIBRARY_ID: lib}
    return adata


def _element_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name)) or "slide"


def _spot_diameter_px(adata, scalefactors: dict, func: str) -> float:
    """The spot diameter in full-resolution pixels: the physical one (tissuegraph's
    ``spot_diameter_um`` over µm per pixel), else ``spot_diameter_fullres``, else 55 µm."""
    from tissuegraph.graph.coords import VISIUM_SPOT_UM, microns_per_pixel

    mpp = microns_per_pixel(adata)
    um = (adata.uns.get(L.TISSUEGRAPH) or {}).get(L.SPOT_DIAMETER_UM)
    if um and mpp:
        return float(um) / mpp
    if scalefactors.get("spot_diameter_fullres"):
        return float(scalefactors["spot_diameter_fullres"])
    if mpp:
        return VISIUM_SPOT_UM / mpp
    raise InputError(
        f"{func}: the spot size in pixels is unknown: give uns['spatial'][library_id]"
        "['scalefactors']['spot_diameter_fullres'] or uns['tissuegraph']['microns_per_pixel']"
    )


def to_spatialdata(
    adata,
    *,
    library_id: str | None = None,
    table_key: str = "table",
    coordinate_system: str = "global",
):
    """An AnnData in tissuegraph's (or scanpy's) layout as a SpatialData object.

    Parameters
    ----------
    adata
        One slide with ``obsm["spatial"]`` in full-resolution pixels (any tissuegraph reader,
        ``sc.read_visium``; embeddings and niches of :mod:`tissuegraph.tl` are carried along).
    library_id
        Which library of ``uns["spatial"]``; default: ``uns["tissuegraph"]["library_id"]``,
        else the only one.
    table_key
        Key of the table in the result.
    coordinate_system
        Name of the full-resolution pixel coordinate system.

    Returns
    -------
    ``SpatialData`` with

    - ``shapes[library_id]``: one circle per spot at ``obsm["spatial"]``, radius half the
      spot diameter in full-resolution pixels (the physical ``spot_diameter_um`` over µm per
      pixel when known, else ``spot_diameter_fullres``); identity to ``coordinate_system``;
    - ``images[f"{library_id}_{name}_image"]`` for each in-memory image of
      ``uns["spatial"][library_id]["images"]`` (``hires``, ``lowres``), scaled into
      ``coordinate_system`` by ``1 / tissue_{name}_scalef``;
    - ``tables[table_key]``: a copy of ``adata`` (``X``, ``obs``, ``obsm`` with the
      embeddings, ``obsp``, ``uns``; the images move out of ``uns["spatial"]``, the scale
      factors stay) annotating the shapes through ``obs["region"]`` and ``obs["spot_id"]``
      (overwritten when present).

    A full-resolution image file (``uns["tissuegraph"]["image_path"]``) is not copied in;
    its path stays in the table's ``uns["tissuegraph"]``.
    """
    func = "to_spatialdata"
    sd = _spatialdata(func)
    from anndata import AnnData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    if not isinstance(adata, AnnData):
        raise InputError(f"{func}: expected an AnnData, got {type(adata).__name__}")
    if L.SPATIAL not in adata.obsm:
        raise InputError(f"{func}: obsm['spatial'] not found: read the slide with tissuegraph.io")
    spatial = dict(adata.uns.get(L.SPATIAL) or {})
    lib = library_id or (adata.uns.get(L.TISSUEGRAPH) or {}).get(L.LIBRARY_ID)
    if lib is None and len(spatial) == 1:
        lib = next(iter(spatial))
    lib = str(lib or "slide")
    entry = dict(spatial.get(lib) or {})
    scalefactors = dict(entry.get("scalefactors") or {})
    name = _element_name(lib)
    xy = np.asarray(adata.obsm[L.SPATIAL], dtype=np.float64)[:, :2]
    radius = 0.5 * _spot_diameter_px(adata, scalefactors, func)
    n = adata.n_obs
    shapes = ShapesModel.parse(
        xy,
        geometry=0,
        radius=np.full(n, radius),
        index=pd.RangeIndex(n),
        transformations={coordinate_system: Identity()},
    )
    images = {}
    for key, img in dict(entry.get("images") or {}).items():
        s = scalefactors.get(f"tissue_{key}_scalef")
        if not s:
            warnings.warn(
                f"{func}: image {key!r} has no tissue_{key}_scalef; left out", stacklevel=2
            )
            continue
        a = np.asarray(img)
        a = a[..., None] if a.ndim == 2 else a
        images[f"{name}_{_element_name(key)}_image"] = Image2DModel.parse(
            np.moveaxis(a, -1, 0),
            dims=("c", "y", "x"),
            transformations={coordinate_system: Scale([1.0 / s, 1.0 / s], axes=("y", "x"))},
        )
    table = adata.copy()
    if entry:
        table.uns[L.SPATIAL] = {
            lib: {k: v for k, v in entry.items() if k != "images"},
            **{k: v for k, v in spatial.items() if k != lib},
        }
    table.obs[REGION_KEY] = pd.Categorical([name] * n)
    table.obs[INSTANCE_KEY] = np.arange(n, dtype=np.int64)
    table.uns.pop("spatialdata_attrs", None)
    table = TableModel.parse(table, region=name, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    return sd.SpatialData(images=images, shapes={name: shapes}, tables={table_key: table})
