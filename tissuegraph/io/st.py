"""Legacy Spatial Transcriptomics (ST) reader: counts table + spot table + H&E image."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from tissuegraph._layout import slide_anndata
from tissuegraph.errors import InputError
from tissuegraph.io._common import (
    as_path,
    check_inside_image,
    check_values,
    estimate_pixel_pitch,
    one_line,
)

__all__ = ["read_st"]

SPOT_COLUMNS = ["x", "y", "pixel_x", "pixel_y"]


def _read_counts(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: is a folder; expected a counts table")
    try:
        df = pd.read_csv(path, sep="\t", index_col=0)
    except Exception as exc:  # gzip / parser errors of many kinds
        raise InputError(
            f"{path}: unreadable counts table ({one_line(exc)}); expected a tab-separated "
            "spots x genes table whose first column is the spot id 'XxY'"
        ) from None
    if df.shape[1] == 0:
        raise InputError(f"{path}: zero genes in the counts table; expected spots x genes")
    if df.shape[0] == 0:
        raise InputError(f"{path}: zero spots in the counts table; expected spots x genes")
    df.index = df.index.astype(str)
    bad = [c for c, k in zip(df.columns, df.dtypes) if k.kind not in "iufb"]
    if bad:
        raise InputError(
            f"{path}: non-numeric counts in column(s) {bad[:3]}; expected a spots x genes "
            "table of counts"
        )
    if not df.index.is_unique:
        dup = df.index[df.index.duplicated()][0]
        raise InputError(f"{path}: spot id {dup!r} occurs more than once in the counts table")
    check_values(
        df.to_numpy(dtype=np.float32), source=path, obs_names=df.index, var_names=df.columns
    )
    return df


def _read_spots(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: is a folder; expected a spot table")
    try:
        df = pd.read_csv(path, sep="\t")
        if df.shape[1] == 1:  # comma-separated variant
            df = pd.read_csv(path)
    except Exception as exc:
        raise InputError(f"{path}: unreadable spot table ({one_line(exc)})") from None
    missing = [c for c in SPOT_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {missing}; expected x, y, pixel_x, pixel_y "
            "(and optionally new_x, new_y, selected)"
        )
    return df


def read_st(
    counts: str | os.PathLike,
    spots: str | os.PathLike,
    image: str | os.PathLike | None,
    *,
    spot_diameter_um: float = 100.0,
    spot_spacing_um: float = 200.0,
    library_id: str | None = None,
):
    """Read a legacy Spatial Transcriptomics section (the her2st / ST-Net layout).

    Parameters
    ----------
    counts
        Tab-separated spots x genes counts (``.tsv`` or ``.tsv.gz``); the first column is the
        spot id ``"{x}x{y}"`` in array coordinates.
    spots
        Spot table with columns ``x``, ``y`` (array), ``pixel_x``, ``pixel_y`` (spot centre in
        ``image`` pixels) and optionally ``new_x``, ``new_y``, ``selected`` (1 = under tissue).
    image
        The full-resolution H&E (JPEG, TIFF or PNG); recorded as
        ``uns["tissuegraph"]["image_path"]`` and read lazily. ``None`` for no image.
    spot_diameter_um, spot_spacing_um
        Physical spot size and centre-to-centre spacing of the array (100 / 200 µm for ST).
    library_id
        Key in ``uns["spatial"]``; defaults to the name of the counts file's folder.

    Returns
    -------
    AnnData (layout of :func:`read_visium`) with the ``selected`` spots present in the counts;
    ``obs["array_row"] = y``, ``obs["array_col"] = x``; ``grid = "square"``.
    ``microns_per_pixel`` is ``spot_spacing_um`` over the pixel pitch fitted on all spots.
    Small ``hires`` (about 2000 px) and ``lowres`` (about 600 px) thumbnails of the image are
    stored in ``uns["spatial"]`` for plotting.
    """
    from tissuegraph.io.image import image_shape, read_thumbnail

    counts = as_path(counts, "ST counts table")
    spots = as_path(spots, "ST spot table")
    cdf = _read_counts(counts)
    sdf = _read_spots(spots)
    for c in SPOT_COLUMNS:
        sdf[c] = pd.to_numeric(sdf[c], errors="coerce").astype(np.float64)
    if not np.isfinite(sdf[SPOT_COLUMNS].to_numpy()).all():
        raise InputError(f"{spots}: non-numeric, empty or infinite x, y, pixel_x or pixel_y values")
    ids = [f"{int(round(x))}x{int(round(y))}" for x, y in zip(sdf["x"], sdf["y"])]
    sdf.index = pd.Index(ids)
    sdf = sdf[~sdf.index.duplicated()]
    if len(sdf) < 3:
        raise InputError(f"{spots}: fewer than 3 spots; cannot estimate the pixel scale")
    pitch = estimate_pixel_pitch(
        sdf[["x", "y"]].to_numpy(float), sdf[["pixel_x", "pixel_y"]].to_numpy(float)
    )
    if not np.isfinite(pitch) or pitch <= 0:
        raise InputError(f"{spots}: pixel_x/pixel_y do not vary with x/y; cannot estimate scale")
    mpp = spot_spacing_um / pitch
    selected = sdf["selected"].to_numpy() == 1 if "selected" in sdf.columns else np.ones(len(sdf))
    sel = sdf[selected.astype(bool)]
    absent = ~cdf.index.isin(sdf.index)
    if absent.all():
        raise InputError(
            f"{spots}: none of the {len(cdf)} spot ids of {counts.name} (e.g. {cdf.index[0]}) "
            "are in the spot table (ids are 'XxY' from columns x, y); the files do not match"
        )
    if absent.any():
        warnings.warn(
            f"{counts.name}: {int(absent.sum())} spot(s) absent from {spots.name} were dropped",
            stacklevel=2,
        )
    keep = cdf.index[cdf.index.isin(sel.index)]
    if len(keep) == 0:
        raise InputError(f"{spots}: no selected spot (selected == 1) is in {counts.name}")
    cdf = cdf.loc[keep]
    sel = sel.loc[keep]
    xy = sel[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    images: dict[str, np.ndarray] = {}
    scalef = {"spot_diameter_fullres": spot_diameter_um / mpp}
    image_path = None
    if image is not None:
        image_path = as_path(image, "ST H&E image").resolve()
        shape = image_shape(image_path)
        check_inside_image(
            xy,
            shape,
            scalef["spot_diameter_fullres"],
            str(spots),
            f"pixel_x/pixel_y do not refer to {image_path.name}",
        )
        for key, target in (("hires", 2000), ("lowres", 600)):
            img, s = read_thumbnail(image_path, target)
            images[key] = img
            scalef[f"tissue_{key}_scalef"] = s
    extra = pd.DataFrame(index=sel.index)
    for c in ("new_x", "new_y"):
        if c in sel.columns:
            extra[c] = pd.to_numeric(sel[c], errors="coerce").to_numpy(np.float64)
    if library_id is None:
        library_id = counts.parent.name
    X = cdf.to_numpy(dtype=np.float32)
    return slide_anndata(
        X,
        obs_names=sel.index,
        var_names=cdf.columns,
        gene_ids=cdf.columns,
        in_tissue=np.ones(len(sel), dtype=np.int64),
        array_row=sel["y"].round().astype(int).to_numpy(),
        array_col=sel["x"].round().astype(int).to_numpy(),
        spatial_px=xy,
        microns_per_pixel=mpp,
        library_id=str(library_id),
        platform="st",
        spot_diameter_um=spot_diameter_um,
        spot_spacing_um=spot_spacing_um,
        grid="square",
        image_path=None if image_path is None else str(image_path),
        source=str(counts.parent.resolve()),
        images=images,
        scalefactors=scalef,
        metadata={"counts": str(counts), "spots": str(spots)},
        extra_obs=extra,
    )
