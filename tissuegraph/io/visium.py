"""10x Genomics Visium / Visium HD reader (Space Ranger output folders)."""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tissuegraph._layout import slide_anndata
from tissuegraph.errors import InputError
from tissuegraph.io._common import (
    as_path,
    check_inside_image,
    check_values,
    estimate_pixel_pitch,
    one_line,
    sparse_index_problem,
)

__all__ = ["read_visium", "read_10x_h5", "read_10x_mtx", "read_positions"]

VISIUM_SPOT_UM = 55.0
VISIUM_SPACING_UM = 100.0
POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]
_GENE_EXPRESSION = "Gene Expression"
#: Matrix barcodes without a position that are dropped (with a warning) rather than refused.
MAX_UNPLACED_FRACTION = 0.01


# ----------------------------------------------------------------------------- matrices
def _decode(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind == "S" or a.dtype.kind == "O":
        return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in a], dtype=object)
    return a.astype(str).astype(object)


def read_10x_h5(path: str | os.PathLike) -> tuple[sp.csr_matrix, np.ndarray, pd.DataFrame]:
    """Read a 10x HDF5 feature-barcode matrix (v3 ``matrix/`` layout, or the legacy v2 layout).

    Only ``Gene Expression`` features are kept when ``features/feature_type`` exists.

    Returns
    -------
    ``(X, barcodes, features)``: ``X`` csr float32 ``[n_barcodes, n_features]``, the barcodes
    and a DataFrame with columns ``gene_ids``, ``name``, ``feature_type``.
    """
    import h5py

    path = as_path(path, "10x HDF5 matrix")
    if not path.is_file():
        raise InputError(f"{path}: is a folder; expected a 10x feature-barcode HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            if "matrix" in f:
                g = f["matrix"]
                feats = g["features"]
                ids = _decode(feats["id"][:])
                names = _decode(feats["name"][:])
                ftype = (
                    _decode(feats["feature_type"][:])
                    if "feature_type" in feats
                    else np.full(len(ids), _GENE_EXPRESSION, dtype=object)
                )
            else:  # legacy (Cell Ranger 2) layout: one group per genome
                groups = [k for k in f.keys() if isinstance(f[k], h5py.Group)]
                if not groups:
                    raise KeyError("matrix")
                g = f[groups[0]]
                ids = _decode(g["genes"][:])
                names = _decode(g["gene_names"][:])
                ftype = np.full(len(ids), _GENE_EXPRESSION, dtype=object)
            barcodes = _decode(g["barcodes"][:])
            data = np.asarray(g["data"][:])
            indices = np.asarray(g["indices"][:])
            indptr = np.asarray(g["indptr"][:])
            shape = np.asarray(g["shape"][:]).ravel()
    except InputError:
        raise
    except KeyError as exc:
        raise InputError(
            f"{path}: not a 10x feature-barcode HDF5 (missing {exc}); expected matrix/data, "
            "indices, indptr, shape, barcodes and features/id, name"
        ) from None
    except Exception as exc:  # h5py raises many types on damaged files
        raise InputError(
            f"{path}: unreadable HDF5 file ({one_line(exc)}); re-export or re-download it"
        ) from None
    if shape.size != 2 or shape.dtype.kind not in "iu" or (shape < 0).any():
        raise InputError(
            f"{path}: matrix/shape is {shape.tolist()}, not two counts; the file is corrupt"
        )
    n_feat, n_bc = (int(v) for v in shape)
    if (
        len(barcodes) != n_bc
        or len(ids) != n_feat
        or len(names) != n_feat
        or len(ftype) != n_feat
        or len(indptr) != n_bc + 1
        or len(indices) != len(data)
    ):
        raise InputError(
            f"{path}: inconsistent matrix (shape {(n_feat, n_bc)}, {len(barcodes)} barcodes, "
            f"{len(ids)} features, {len(indptr)} indptr entries, {len(data)} values for "
            f"{len(indices)} indices); the file is corrupt"
        )
    problem = sparse_index_problem(indptr, indices, n_bc, n_feat)
    if problem:
        raise InputError(f"{path}: corrupt sparse matrix ({problem}); re-export the file")
    try:
        X = sp.csr_matrix(
            (data.astype(np.float32, copy=False), indices, indptr), shape=(n_bc, n_feat)
        )
        X.check_format(full_check=True)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(
            f"{path}: corrupt sparse matrix ({one_line(exc)}); re-export the file"
        ) from None
    X, barcodes, features = _gene_expression_only(X, barcodes, ids, names, ftype)
    check_values(X, source=path, obs_names=barcodes, var_names=features["name"].to_numpy())
    return X, barcodes, features


def _read_table_lines(path: Path) -> list[list[str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as fh:
            return [line.rstrip("\n").split("\t") for line in fh if line.strip()]
    except Exception as exc:  # gzip / zlib / decoding errors of many kinds
        raise InputError(
            f"{path}: unreadable ({one_line(exc)}); re-export the matrix folder"
        ) from None


def _first(folder: Path, names: list[str]) -> Path | None:
    for n in names:
        if (folder / n).exists():
            return folder / n
    return None


def read_10x_mtx(folder: str | os.PathLike) -> tuple[sp.csr_matrix, np.ndarray, pd.DataFrame]:
    """Read a 10x Matrix Market folder (``matrix.mtx[.gz]``, ``barcodes.tsv[.gz]``,
    ``features.tsv[.gz]`` or legacy ``genes.tsv``). Same return values as :func:`read_10x_h5`."""
    import scipy.io

    folder = as_path(folder, "10x matrix folder")
    mtx = _first(folder, ["matrix.mtx.gz", "matrix.mtx"])
    bc = _first(folder, ["barcodes.tsv.gz", "barcodes.tsv"])
    ft = _first(folder, ["features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"])
    for f, name in ((mtx, "matrix.mtx.gz"), (bc, "barcodes.tsv.gz"), (ft, "features.tsv.gz")):
        if f is None:
            raise InputError(f"{folder}: {name} is missing; a 10x matrix folder needs it")
    for f in (mtx, bc, ft):
        if not f.is_file():
            raise InputError(f"{f}: is a folder; expected a file of the 10x matrix folder")
    try:
        opener = gzip.open if mtx.suffix == ".gz" else open
        with opener(mtx, "rb") as fh:
            M = scipy.io.mmread(fh)
        if M.ndim != 2 or M.dtype.kind not in "biuf":
            raise ValueError(f"a {M.dtype} matrix, not counts")
        X = sp.csr_matrix(M.T, dtype=np.float32)
    except Exception as exc:  # gzip, the Matrix Market parser and numpy raise many types
        raise InputError(
            f"{mtx}: unreadable Matrix Market file ({one_line(exc)}); re-export it"
        ) from None
    barcodes = np.array([r[0] for r in _read_table_lines(bc)], dtype=object)
    rows = _read_table_lines(ft)
    ids = np.array([r[0] for r in rows], dtype=object)
    names = np.array([r[1] if len(r) > 1 else r[0] for r in rows], dtype=object)
    ftype = np.array([r[2] if len(r) > 2 else _GENE_EXPRESSION for r in rows], dtype=object)
    if M.shape != (len(ids), len(barcodes)):
        raise InputError(
            f"{mtx}: matrix shape {M.shape} does not match {len(ids)} features x "
            f"{len(barcodes)} barcodes; the folder is inconsistent"
        )
    X, barcodes, features = _gene_expression_only(X, barcodes, ids, names, ftype)
    check_values(X, source=mtx, obs_names=barcodes, var_names=features["name"].to_numpy())
    return X, barcodes, features


def _gene_expression_only(X, barcodes, ids, names, ftype):
    """``(X, barcodes, features)`` restricted to "Gene Expression" features."""
    features = pd.DataFrame({"gene_ids": ids, "name": names, "feature_type": ftype})
    keep = np.asarray(features["feature_type"] == _GENE_EXPRESSION)
    if not keep.all():
        X = X[:, np.flatnonzero(keep)]
        features = features.loc[keep].reset_index(drop=True)
    return X.tocsr(), barcodes, features


# ----------------------------------------------------------------------------- positions
def read_positions(path: str | os.PathLike) -> pd.DataFrame:
    """Read Space Ranger spot positions: v1 ``tissue_positions_list.csv`` (no header), v2
    ``tissue_positions.csv`` (header) or Visium HD ``tissue_positions.parquet``.

    Returns a DataFrame indexed by barcode with ``in_tissue``, ``array_row``, ``array_col``,
    ``pxl_row_in_fullres``, ``pxl_col_in_fullres``.
    """
    path = as_path(path, "spot positions file")
    if not path.is_file():
        raise InputError(f"{path}: is a folder; expected a spot positions file")
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            with open(path) as fh:
                first = fh.readline()
            header = first.lower().startswith("barcode")
            df = pd.read_csv(path, header=0 if header else None)
            if not header:
                if df.shape[1] != 6:
                    raise InputError(
                        f"{path}: expected 6 columns ({', '.join(POSITION_COLUMNS)}), "
                        f"found {df.shape[1]}"
                    )
                df.columns = POSITION_COLUMNS
    except InputError:
        raise
    except Exception as exc:  # pandas / pyarrow parse errors of many kinds
        raise InputError(f"{path}: unreadable positions file ({one_line(exc)})") from None
    missing = [c for c in POSITION_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {missing}; expected {', '.join(POSITION_COLUMNS)}"
        )
    df = df[POSITION_COLUMNS].copy()
    df["barcode"] = df["barcode"].astype(str)
    df = df.drop_duplicates("barcode").set_index("barcode")
    for c in POSITION_COLUMNS[1:]:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(np.float64)
    values = df.to_numpy(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError(
            f"{path}: {int(bad.sum())} non-numeric, empty or infinite value(s) in the position "
            f"columns, e.g. {df.columns[c]} of barcode {df.index[r]!r}"
        )
    lattice = values[:, :3]
    if (lattice != np.round(lattice)).any() or not df["in_tissue"].isin((0, 1)).all():
        raise InputError(
            f"{path}: in_tissue must be 0 or 1 and array_row / array_col whole numbers"
        )
    for c in POSITION_COLUMNS[1:4]:
        df[c] = df[c].astype(np.int64)
    return df


# ----------------------------------------------------------------------------- the reader
def _find_matrix(folder: Path) -> Path | None:
    for name in ("filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix"):
        if (folder / name).exists():
            return folder / name
    cands = sorted(folder.glob("*filtered_feature_bc_matrix.h5"))
    return cands[0] if cands else None


def _resolve_folder(path: Path) -> Path:
    """The folder holding the matrix and ``spatial/``; descends into Visium HD ``binned_outputs``."""
    if _find_matrix(path) is not None:
        return path
    if (path / "outs").is_dir() and _find_matrix(path / "outs") is not None:
        return path / "outs"
    for root in (path, path / "outs"):
        binned = root / "binned_outputs"
        if binned.is_dir():
            bins = sorted(p for p in binned.iterdir() if p.is_dir())
            pref = [p for p in bins if p.name == "square_008um"]
            for p in pref + bins:
                if _find_matrix(p) is not None:
                    return p
    raise InputError(
        f"{path}: no filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix/ folder; "
        "pass a Space Ranger output folder (or a Visium HD binned_outputs/square_XXXum folder)"
    )


def _find_positions(spatial: Path) -> Path:
    for name in (
        "tissue_positions.parquet",
        "tissue_positions.csv",
        "tissue_positions_list.csv",
    ):
        if (spatial / name).exists():
            return spatial / name
    raise InputError(
        f"{spatial}: no tissue_positions.parquet, tissue_positions.csv or "
        "tissue_positions_list.csv; copy the spatial/ folder of the Space Ranger output"
    )


def _bin_size_from_name(folder: Path) -> float | None:
    m = re.search(r"square_(\d+)um", folder.name)
    return float(m.group(1)) if m else None


def read_visium(
    path: str | os.PathLike,
    *,
    image_path: str | os.PathLike | None = None,
    library_id: str | None = None,
):
    """Read a 10x Visium (or Visium HD binned) Space Ranger output folder.

    Parameters
    ----------
    path
        Space Ranger ``outs`` folder holding ``filtered_feature_bc_matrix.h5`` (or the
        ``filtered_feature_bc_matrix/`` Matrix Market folder) and ``spatial/`` with the
        positions (v1 ``tissue_positions_list.csv``, v2 ``tissue_positions.csv`` or Visium HD
        ``tissue_positions.parquet``), ``scalefactors_json.json`` and the hires / lowres PNGs.
        A Visium HD output folder resolves to ``binned_outputs/square_008um``.
    image_path
        Optional full-resolution H&E (TIFF / BigTIFF, JPEG or PNG) that the positions refer to.
        It is not loaded: its path is recorded in ``uns["tissuegraph"]["image_path"]`` and read
        lazily by :func:`tissuegraph.io.open_image`.
    library_id
        Key in ``uns["spatial"]``; defaults to the library id stored in the matrix file, else
        the folder name.

    Returns
    -------
    AnnData with raw counts in ``X`` (csr float32, spots x genes, only spots of the matrix),
    ``obs[["in_tissue", "array_row", "array_col"]]``, ``obsm["spatial"]`` (full-resolution px,
    x = column, y = row), ``obsm["spatial_um"]``, ``uns["spatial"][library_id]`` and
    ``uns["tissuegraph"]`` (platform, microns_per_pixel, grid, image_path, ...).
    """
    from tissuegraph.io.image import image_shape, read_small_image

    root = as_path(path, "Space Ranger folder")
    if not root.is_dir():
        raise InputError(f"{root}: expected a Space Ranger output folder, got a file")
    folder = _resolve_folder(root)
    mat = _find_matrix(folder)
    spatial = folder / "spatial"
    if not spatial.is_dir():
        raise InputError(
            f"{folder}: no spatial/ folder; copy it from the Space Ranger output "
            "(positions, scalefactors_json.json, images)"
        )
    # --- matrix
    if mat.is_dir():
        X, barcodes, features = read_10x_mtx(mat)
        h5_library = None
    else:
        X, barcodes, features = read_10x_h5(mat)
        h5_library = _h5_library_id(mat)
    if X.shape[1] == 0:
        raise InputError(
            f"{mat}: zero 'Gene Expression' features; the matrix holds no genes to read"
        )
    # --- positions
    pos_path = _find_positions(spatial)
    pos = read_positions(pos_path)
    bc = pd.Index([str(b) for b in barcodes])
    if not bc.is_unique:
        dup = bc[bc.duplicated()][0]
        raise InputError(f"{mat}: barcode {dup!r} occurs more than once; the matrix is corrupt")
    missing = ~bc.isin(pos.index)
    if missing.any():
        n_missing = int(missing.sum())
        some = ", ".join(bc[np.flatnonzero(missing)[:3]])
        if n_missing > MAX_UNPLACED_FRACTION * len(bc):
            raise InputError(
                f"{pos_path}: {n_missing} of {len(bc)} matrix barcodes are absent (e.g. {some}; "
                f"at most {MAX_UNPLACED_FRACTION:.0%} may be); the positions file belongs to "
                "another slide"
            )
        warnings.warn(
            f"{pos_path.name}: {n_missing} of {len(bc)} matrix barcodes have no position and "
            f"were dropped ({some})",
            stacklevel=2,
        )
        keep = np.flatnonzero(~missing)
        X, bc = X[keep], bc[keep]
    lattice = pos[["array_col", "array_row", "pxl_col_in_fullres", "pxl_row_in_fullres"]]
    pos = pos.loc[bc]
    # --- scale factors
    sf_path = spatial / "scalefactors_json.json"
    if not sf_path.exists():
        raise InputError(f"{spatial}: scalefactors_json.json is missing; copy it from Space Ranger")
    try:
        sf_raw = json.loads(sf_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{sf_path}: not valid JSON ({one_line(exc)})") from None
    if not isinstance(sf_raw, dict):
        raise InputError(f"{sf_path}: expected a JSON object of scale factors")
    scalef = {
        k: float(v)
        for k, v in sf_raw.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for k, v in scalef.items():
        positive = k in ("spot_diameter_fullres", "bin_size_um", "microns_per_pixel")
        if not math.isfinite(v) or ((positive or k.endswith("_scalef")) and v <= 0):
            raise InputError(f"{sf_path}: {k} = {v} is not a positive, finite number")
    if "spot_diameter_fullres" not in scalef:
        raise InputError(f"{sf_path}: spot_diameter_fullres is missing or not a number")
    # --- platform and scale
    bin_size = scalef.get("bin_size_um") or _bin_size_from_name(folder)
    is_hd = pos_path.suffix == ".parquet" or "bin_size_um" in scalef or bin_size is not None
    if is_hd:
        if bin_size is None:
            raise InputError(
                f"{sf_path}: Visium HD bin size unknown; add bin_size_um or keep the "
                "square_XXXum folder name"
            )
        platform, spot_um, spacing_um, grid = "visium_hd", bin_size, bin_size, "square"
        mpp_sf = scalef.get("microns_per_pixel") or bin_size / scalef["spot_diameter_fullres"]
        lat_um = lattice[["array_col", "array_row"]].to_numpy(float) * bin_size
    else:
        platform, spot_um, spacing_um, grid = "visium", VISIUM_SPOT_UM, VISIUM_SPACING_UM, "hex"
        mpp_sf = VISIUM_SPOT_UM / scalef["spot_diameter_fullres"]
        # hexagonal lattice: array_col steps 2 per 100 um, array_row steps sqrt(3)/2 * 100 um
        lat_um = lattice[["array_col", "array_row"]].to_numpy(float) * np.array(
            [VISIUM_SPACING_UM / 2.0, VISIUM_SPACING_UM * np.sqrt(3.0) / 2.0]
        )
    mpp, mpp_method = _lattice_mpp(lat_um, lattice, mpp_sf, scalef, is_hd)
    # --- images
    images = {}
    for key in ("hires", "lowres"):
        p = spatial / f"tissue_{key}_image.png"
        if not p.exists():
            continue
        if f"tissue_{key}_scalef" not in scalef:
            warnings.warn(
                f"{p.name}: no tissue_{key}_scalef in {sf_path.name}; the image is not used",
                stacklevel=2,
            )
            continue
        images[key] = read_small_image(p)
    xy = np.stack(
        [pos["pxl_col_in_fullres"].to_numpy(float), pos["pxl_row_in_fullres"].to_numpy(float)],
        axis=1,
    )
    tol = 2.0 * scalef["spot_diameter_fullres"]
    if image_path is not None:
        image_path = as_path(image_path, "full-resolution image").resolve()
        check_inside_image(
            xy,
            image_shape(image_path),
            tol,
            str(image_path),
            "this image does not match the slide's positions",
        )
    else:
        for key, img in images.items():
            s = scalef.get(f"tissue_{key}_scalef")
            if s and img.mean() > 0:
                full = (int(round(img.shape[0] / s)), int(round(img.shape[1] / s)))
                check_inside_image(
                    xy,
                    full,
                    tol + 2.0 / s,
                    str(spatial / f"tissue_{key}_image.png"),
                    f"tissue_{key}_scalef in scalefactors_json.json does not match the image",
                )
    if library_id is None:
        library_id = h5_library or (
            f"{root.name}_{folder.name}" if folder != root and is_hd else root.name
        )
    metadata = {
        "microns_per_pixel_method": mpp_method,
        "microns_per_pixel_scalefactors": float(mpp_sf),
    }
    if h5_library:
        metadata["library_id_in_matrix"] = h5_library
    return slide_anndata(
        X,
        obs_names=bc,
        var_names=features["name"],
        gene_ids=features["gene_ids"],
        in_tissue=pos["in_tissue"].to_numpy(),
        array_row=pos["array_row"].to_numpy(),
        array_col=pos["array_col"].to_numpy(),
        spatial_px=xy,
        microns_per_pixel=mpp,
        library_id=str(library_id),
        platform=platform,
        spot_diameter_um=spot_um,
        spot_spacing_um=spacing_um,
        grid=grid,
        image_path=None if image_path is None else str(image_path),
        source=str(folder.resolve()),
        images=images,
        scalefactors=scalef,
        metadata=metadata,
    )


def _h5_library_id(path: Path) -> str | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            ids = f.attrs.get("library_ids")
        if ids is None:
            return None
        ids = np.atleast_1d(ids)
        if len(ids) != 1:
            return None
        v = ids[0].decode() if isinstance(ids[0], bytes) else str(ids[0])
    except Exception:  # a damaged attribute: fall back to the folder name
        return None
    return None if v in ("", "custom") or "/" in v else v


def _lattice_mpp(lat_um, lattice, mpp_sf, scalef, is_hd) -> tuple[float, str]:
    """Microns per full-resolution pixel from the spot lattice (its pitch is exact: 100 um
    for Visium, the bin size for Visium HD), else from the scale factors."""
    if is_hd and scalef.get("microns_per_pixel"):
        return float(scalef["microns_per_pixel"]), "scalefactors"
    n = len(lat_um)
    sel = np.arange(n)
    if n > 200_000:
        sel = np.random.default_rng(0).choice(n, 200_000, replace=False)
    px = lattice[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)[sel]
    pitch = estimate_pixel_pitch(lat_um[sel], px)  # px per um
    if np.isfinite(pitch) and pitch > 0:
        return 1.0 / pitch, "lattice"
    return float(mpp_sf), "scalefactors"
