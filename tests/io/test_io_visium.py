"""Space Ranger reader on real slides and on layouts rebuilt in tmp_path."""

from __future__ import annotations

import gzip
import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from scipy.spatial import cKDTree

from tissuegraph.errors import InputError
from tissuegraph.io import read_10x_h5, read_visium
from tissuegraph.io._common import make_unique


@pytest.fixture(scope="session")
def dlpfc(dlpfc_dir):
    return read_visium(dlpfc_dir)


@pytest.fixture(scope="session")
def toy_dir(data_dir):
    return data_dir / "visium_toy"


@pytest.fixture(scope="session")
def toy(toy_dir):
    return read_visium(toy_dir)


def write_10x_h5(path, X, barcodes, ids, names, ftypes=None):
    """Minimal 10x HDF5 (v3 layout) writer for tests; X is barcodes x features."""
    Xc = sp.csr_matrix(X)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"] = Xc.data.astype(np.int32)
        g["indices"] = Xc.indices.astype(np.int64)
        g["indptr"] = Xc.indptr.astype(np.int64)
        g["shape"] = np.array([Xc.shape[1], Xc.shape[0]], dtype=np.int32)
        g["barcodes"] = np.array(barcodes, dtype="S")
        ft = g.create_group("features")
        ft["id"] = np.array(ids, dtype="S")
        ft["name"] = np.array(names, dtype="S")
        if ftypes is not None:
            ft["feature_type"] = np.array(ftypes, dtype="S")


def copy_spatial(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "spatial", dst / "spatial")
    for p in (dst / "spatial").iterdir():
        p.chmod(0o644)
    (dst / "spatial").chmod(0o755)


# ----------------------------------------------------------------------------- real data
def test_dlpfc_layout(dlpfc):
    a = dlpfc
    assert a.shape == (3639, 5000)
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.float32
    assert a.var_names.is_unique
    assert a.var["gene_ids"].str.startswith("ENSG").all()
    assert float(a.X.sum()) > 0 and np.allclose(a.X.data, np.round(a.X.data))
    for c in ("in_tissue", "array_row", "array_col"):
        assert a.obs[c].dtype.kind == "i"
    assert a.obsm["spatial"].shape == (3639, 2) and a.obsm["spatial"].dtype == np.float64
    tg = a.uns["tissuegraph"]
    assert tg["platform"] == "visium" and tg["grid"] == "hex"
    assert tg["library_id"] == "151673" and tg["image_path"] is None
    lib = a.uns["spatial"]["151673"]
    assert lib["images"]["lowres"].shape == (600, 600, 3)
    assert lib["images"]["lowres"].dtype == np.uint8
    assert "hires" not in lib["images"]
    assert lib["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(0.045004502)
    np.testing.assert_allclose(a.obsm["spatial_um"], a.obsm["spatial"] * tg["microns_per_pixel"])


def test_dlpfc_micron_scale(dlpfc):
    """Neighbouring Visium spots are 100 um apart (centre to centre)."""
    xy = dlpfc.obsm["spatial_um"]
    d, _ = cKDTree(xy).query(xy, k=7)
    assert np.median(d[:, 1]) == pytest.approx(100.0, rel=0.03)
    assert np.median(d[:, 6]) == pytest.approx(100.0, rel=0.05)  # six ring neighbours


def test_dlpfc_matches_positions_file(dlpfc, dlpfc_dir):
    pos = pd.read_csv(dlpfc_dir / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    p = pos.loc[dlpfc.obs_names]
    np.testing.assert_array_equal(dlpfc.obsm["spatial"][:, 0], p[5].to_numpy())
    np.testing.assert_array_equal(dlpfc.obsm["spatial"][:, 1], p[4].to_numpy())
    np.testing.assert_array_equal(dlpfc.obs["array_row"], p[2].to_numpy())


def test_toy_positions_larger_than_matrix(toy, toy_dir):
    n_pos = sum(1 for _ in open(toy_dir / "spatial" / "tissue_positions_list.csv"))
    assert n_pos > 1000
    assert toy.shape == (100, 100)
    X, bc, _ = read_10x_h5(toy_dir / "filtered_feature_bc_matrix.h5")
    assert list(toy.obs_names) == list(bc)
    assert toy.uns["spatial"][toy.uns["tissuegraph"]["library_id"]]["images"]["hires"].ndim == 3
    xy = toy.obsm["spatial_um"]
    d, _ = cKDTree(xy).query(xy, k=2)
    assert d[:, 1].min() == pytest.approx(100.0, rel=0.05)


def test_make_unique():
    assert list(make_unique(["A", "B", "A", "A", "A-1"])) == ["A", "B", "A-2", "A-3", "A-1"]


def test_duplicate_symbols_made_unique(tmp_path, toy_dir, toy):
    X, bc, feats = read_10x_h5(toy_dir / "filtered_feature_bc_matrix.h5")
    names = list(feats["name"])
    names[1] = names[0]
    d = tmp_path / "dup"
    copy_spatial(toy_dir, d)
    write_10x_h5(d / "filtered_feature_bc_matrix.h5", X, bc, feats["gene_ids"], names)
    a = read_visium(d)
    assert a.var_names.is_unique and a.var_names[1] == f"{names[0]}-1"


# ----------------------------------------------------------------------------- other layouts
def test_mtx_folder_and_v2_csv(tmp_path, toy_dir, toy):
    X, bc, feats = read_10x_h5(toy_dir / "filtered_feature_bc_matrix.h5")
    d = tmp_path / "mtx"
    copy_spatial(toy_dir, d)
    # v2 positions with a header instead of v1
    v1 = d / "spatial" / "tissue_positions_list.csv"
    pos = pd.read_csv(v1, header=None)
    pos.columns = [
        "barcode",
        "in_tissue",
        "array_row",
        "array_col",
        "pxl_row_in_fullres",
        "pxl_col_in_fullres",
    ]
    pos.to_csv(d / "spatial" / "tissue_positions.csv", index=False)
    v1.unlink()
    m = d / "filtered_feature_bc_matrix"
    m.mkdir()
    # one extra non-gene feature that must be dropped
    extra = sp.csr_matrix(np.ones((X.shape[0], 1), dtype=np.float32))
    full = sp.hstack([X, extra]).tocsr()
    with gzip.open(m / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, full.T.astype(np.int64))
    with gzip.open(m / "barcodes.tsv.gz", "wt") as fh:
        fh.write("\n".join(bc) + "\n")
    with gzip.open(m / "features.tsv.gz", "wt") as fh:
        for i, n in zip(feats["gene_ids"], feats["name"]):
            fh.write(f"{i}\t{n}\tGene Expression\n")
        fh.write("CD3\tCD3_TotalSeqB\tAntibody Capture\n")
    a = read_visium(d)
    assert a.shape == toy.shape
    assert (a.X != toy.X).nnz == 0
    np.testing.assert_array_equal(a.obsm["spatial"], toy.obsm["spatial"])
    assert list(a.var_names) == list(toy.var_names)


def test_visium_hd_parquet(tmp_path, toy_dir, toy):
    root = tmp_path / "hd"
    b = root / "binned_outputs" / "square_008um"
    copy_spatial(toy_dir, b)
    shutil.copy(toy_dir / "filtered_feature_bc_matrix.h5", b / "filtered_feature_bc_matrix.h5")
    sp_dir = b / "spatial"
    pos = pd.read_csv(sp_dir / "tissue_positions_list.csv", header=None)
    (sp_dir / "tissue_positions_list.csv").unlink()
    pos.columns = [
        "barcode",
        "in_tissue",
        "array_row",
        "array_col",
        "pxl_row_in_fullres",
        "pxl_col_in_fullres",
    ]
    # a square lattice of 8 um bins, 2 px per um
    pos["pxl_row_in_fullres"] = pos["array_row"] * 16.0 + 100.0
    pos["pxl_col_in_fullres"] = pos["array_col"] * 16.0 + 50.0
    pos.to_parquet(sp_dir / "tissue_positions.parquet")
    sf = json.loads((sp_dir / "scalefactors_json.json").read_text())
    sf["spot_diameter_fullres"] = 16.0
    (sp_dir / "scalefactors_json.json").write_text(json.dumps(sf))
    a = read_visium(root)  # resolves binned_outputs/square_008um
    tg = a.uns["tissuegraph"]
    assert tg["platform"] == "visium_hd" and tg["grid"] == "square"
    assert tg["spot_spacing_um"] == 8.0 and tg["microns_per_pixel"] == pytest.approx(0.5)
    assert a.n_obs == 100
    # bin size from scalefactors wins over the folder name
    sf["bin_size_um"] = 16.0
    sf["spot_diameter_fullres"] = 32.0
    (sp_dir / "scalefactors_json.json").write_text(json.dumps(sf))
    assert read_visium(b).uns["tissuegraph"]["spot_spacing_um"] == 16.0


# ----------------------------------------------------------------------------- bad input
def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_visium(tmp_path / "nope")


def test_folder_without_matrix(tmp_path):
    with pytest.raises(InputError, match="filtered_feature_bc_matrix"):
        read_visium(tmp_path)


def test_missing_spatial(tmp_path, toy_dir):
    shutil.copy(toy_dir / "filtered_feature_bc_matrix.h5", tmp_path)
    with pytest.raises(InputError, match="spatial/"):
        read_visium(tmp_path)


def test_missing_scalefactors(tmp_path, toy_dir):
    copy_spatial(toy_dir, tmp_path)
    shutil.copy(toy_dir / "filtered_feature_bc_matrix.h5", tmp_path)
    (tmp_path / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(InputError, match="scalefactors_json.json"):
        read_visium(tmp_path)


def _with_barcodes(tmp_path, toy_dir, replace: dict[int, str]):
    X, bc, feats = read_10x_h5(toy_dir / "filtered_feature_bc_matrix.h5")
    bc = list(bc)
    for i, b in replace.items():
        bc[i] = b
    copy_spatial(toy_dir, tmp_path)
    write_10x_h5(
        tmp_path / "filtered_feature_bc_matrix.h5", X, bc, feats["gene_ids"], feats["name"]
    )
    return X, bc


def test_barcode_absent_from_positions_is_dropped(tmp_path, toy_dir, toy):
    """Up to 1% of matrix barcodes without a position: dropped with a warning."""
    X, bc = _with_barcodes(tmp_path, toy_dir, {3: "NOTABARCODE-1"})
    with pytest.warns(UserWarning, match=r"1 of 100 matrix barcodes .*dropped \(NOTABARCODE-1\)"):
        a = read_visium(tmp_path)
    assert a.n_obs == 99 and "NOTABARCODE-1" not in a.obs_names
    keep = [i for i in range(100) if i != 3]
    assert (a.X != toy.X[keep]).nnz == 0
    np.testing.assert_array_equal(a.obsm["spatial"], toy.obsm["spatial"][keep])


def test_barcodes_of_another_slide(tmp_path, toy_dir):
    """More than 1% absent: the positions belong to another slide; the counts are named."""
    _with_barcodes(tmp_path, toy_dir, {3: "NOTABARCODE-1", 7: "NOTABARCODE-2"})
    with pytest.raises(InputError, match="2 of 100 matrix barcodes are absent") as e:
        read_visium(tmp_path)
    assert "another slide" in str(e.value) and "NOTABARCODE-1" in str(e.value)


def test_dlpfc_one_unplaced_barcode(tmp_path, dlpfc_dir, dlpfc):
    """The issue's case: 1 of 3,639 barcodes absent from the positions no longer refuses the
    whole slide."""
    d = tmp_path / "151673"
    copy_spatial(dlpfc_dir, d)
    shutil.copy(dlpfc_dir / "filtered_feature_bc_matrix.h5", d)
    (d / "filtered_feature_bc_matrix.h5").chmod(0o644)
    pos = d / "spatial" / "tissue_positions_list.csv"
    lines = pos.read_text().splitlines()
    gone = dlpfc.obs_names[10]
    pos.write_text("\n".join(ln for ln in lines if not ln.startswith(gone + ",")) + "\n")
    with pytest.warns(UserWarning, match=f"1 of 3639 matrix barcodes .*{gone}"):
        a = read_visium(d)
    assert a.n_obs == 3638 and gone not in a.obs_names


# ----------------------------------------------------------------------------- bad values
def _toy_with_counts(tmp_path, toy_dir, edit):
    X, bc, feats = read_10x_h5(toy_dir / "filtered_feature_bc_matrix.h5")
    X = X.toarray()
    edit(X)
    copy_spatial(toy_dir, tmp_path)
    Xc = sp.csr_matrix(X)
    with h5py.File(tmp_path / "filtered_feature_bc_matrix.h5", "w") as f:
        g = f.create_group("matrix")
        g["data"] = Xc.data.astype(np.float32)  # float storage, so any value can be written
        g["indices"] = Xc.indices.astype(np.int64)
        g["indptr"] = Xc.indptr.astype(np.int64)
        g["shape"] = np.array([Xc.shape[1], Xc.shape[0]], dtype=np.int32)
        g["barcodes"] = np.array(bc, dtype="S")
        ft = g.create_group("features")
        ft["id"] = np.array(feats["gene_ids"], dtype="S")
        ft["name"] = np.array(feats["name"], dtype="S")
    return bc, list(feats["name"])


@pytest.mark.parametrize(
    ("value", "kind"),
    [(np.nan, "NaN"), (-2.0, "negative"), (np.inf, "infinite"), (1.5, "non-integer")],
)
def test_h5_bad_count_values(tmp_path, toy_dir, value, kind):
    def edit(X):
        X[5, 7] = value
        X[9, 2] = value

    bc, names = _toy_with_counts(tmp_path, toy_dir, edit)
    with pytest.raises(InputError) as e:
        read_visium(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "filtered_feature_bc_matrix.h5" in msg
    assert f"2 invalid value(s) in the counts (2 {kind})" in msg
    assert f"spot {bc[5]!r}, gene {names[7]!r}" in msg


def test_mtx_bad_count_values(tmp_path, toy_dir):
    X, bc, feats = read_10x_h5(toy_dir / "filtered_feature_bc_matrix.h5")
    d = tmp_path / "mtx"
    copy_spatial(toy_dir, d)
    m = d / "filtered_feature_bc_matrix"
    m.mkdir()
    M = X.toarray().T.astype(np.float64)
    M[4, 1] = -3.0
    with gzip.open(m / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(M))
    with gzip.open(m / "barcodes.tsv.gz", "wt") as fh:
        fh.write("\n".join(bc) + "\n")
    with gzip.open(m / "features.tsv.gz", "wt") as fh:
        for i, n in zip(feats["gene_ids"], feats["name"]):
            fh.write(f"{i}\t{n}\tGene Expression\n")
    with pytest.raises(InputError, match=r"matrix.mtx.gz: 1 invalid value\(s\) .*negative") as e:
        read_visium(d)
    assert f"spot {bc[1]!r}, gene {feats['name'][4]!r}" in str(e.value)


def test_visium_hd_bad_count_values(tmp_path, toy_dir):
    """Visium HD bins go through the same matrix reader and the same check."""
    root = tmp_path / "hd"
    b = root / "binned_outputs" / "square_008um"

    def edit(X):
        X[0, 0] = np.nan

    _toy_with_counts(b, toy_dir, edit)
    with pytest.raises(InputError, match="square_008um/filtered_feature_bc_matrix.h5: 1 invalid"):
        read_visium(root)


# ----------------------------------------------------------------------------- Space Ranger 3
@pytest.fixture(scope="session")
def sr3_dir(data_dir):
    return data_dir / "visium_sr3_mtx"


def test_sr3_mtx_matches_scanpy(sr3_dir):
    """A real Space Ranger 3.0 matrix-market folder with v2 positions: the counts agree with
    scanpy's own reader, spot for spot and gene for gene."""
    import scanpy as sc

    a = read_visium(sr3_dir)
    ref = sc.read_10x_mtx(sr3_dir / "filtered_feature_bc_matrix", var_names="gene_symbols")
    assert a.shape == ref.shape == (2898, 19465)
    assert list(a.obs_names) == list(ref.obs_names)
    assert list(a.var_names) == list(ref.var_names)
    assert list(a.var["gene_ids"]) == list(ref.var["gene_ids"])
    assert (sp.csr_matrix(a.X) != sp.csr_matrix(ref.X, dtype=np.float32)).nnz == 0
    tg = a.uns["tissuegraph"]
    assert tg["platform"] == "visium" and tg["grid"] == "hex"
    pos = pd.read_csv(sr3_dir / "spatial" / "tissue_positions.csv", index_col=0)
    p = pos.loc[a.obs_names]
    np.testing.assert_array_equal(a.obsm["spatial"][:, 0], p["pxl_col_in_fullres"].to_numpy())
    assert (a.obs["in_tissue"] == 1).all()
    xy = a.obsm["spatial_um"]
    d, _ = cKDTree(xy).query(xy, k=2)
    assert np.median(d[:, 1]) == pytest.approx(100.0, rel=0.03)


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_corrupt_h5(tmp_path, toy_dir, kind):
    copy_spatial(toy_dir, tmp_path)
    raw = (toy_dir / "filtered_feature_bc_matrix.h5").read_bytes()
    data = raw[: len(raw) // 2] if kind == "truncated" else b"not an hdf5 file" * 100
    (tmp_path / "filtered_feature_bc_matrix.h5").write_bytes(data)
    with pytest.raises(InputError, match="filtered_feature_bc_matrix.h5") as e:
        read_visium(tmp_path)
    assert "\n" not in str(e.value)


def test_zero_gene_features(tmp_path, toy_dir):
    X, bc, feats = read_10x_h5(toy_dir / "filtered_feature_bc_matrix.h5")
    copy_spatial(toy_dir, tmp_path)
    write_10x_h5(
        tmp_path / "filtered_feature_bc_matrix.h5",
        X,
        bc,
        feats["gene_ids"],
        feats["name"],
        ["Antibody Capture"] * X.shape[1],
    )
    with pytest.raises(InputError, match="zero 'Gene Expression' features"):
        read_visium(tmp_path)


def test_bad_positions_columns(tmp_path, toy_dir):
    copy_spatial(toy_dir, tmp_path)
    shutil.copy(toy_dir / "filtered_feature_bc_matrix.h5", tmp_path)
    p = tmp_path / "spatial" / "tissue_positions_list.csv"
    p.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(InputError, match="expected 6 columns"):
        read_visium(tmp_path)


def test_image_path_not_matching(tmp_path, toy_dir):
    from PIL import Image

    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(small)
    with pytest.raises(InputError, match="outside the image"):
        read_visium(toy_dir, image_path=small)
    with pytest.raises(InputError, match="not found"):
        read_visium(toy_dir, image_path=tmp_path / "missing.tif")


# ----------------------------------------------------------------------------- found by fuzzing
def test_h5_index_pointers_that_wrap_around(tmp_path, toy_dir):
    """indptr stored as int8 wraps to negative values; scipy's own check skips such a matrix
    and sorting it then crashed. It is refused instead."""
    X, bc, feats = read_10x_h5(toy_dir / "filtered_feature_bc_matrix.h5")
    copy_spatial(toy_dir, tmp_path)
    p = tmp_path / "filtered_feature_bc_matrix.h5"
    write_10x_h5(p, X, bc, feats["gene_ids"], feats["name"])
    with h5py.File(p, "r+") as f:
        indptr = f["matrix/indptr"][:]
        del f["matrix/indptr"]
        f["matrix/indptr"] = indptr.astype(np.int8)
    with pytest.raises(InputError, match=r"corrupt sparse matrix \(index pointers run from 0"):
        read_visium(tmp_path)


def test_image_without_its_scale_factor_is_not_used(tmp_path, toy_dir):
    from tissuegraph.io import open_image

    copy_spatial(toy_dir, tmp_path)
    shutil.copy(toy_dir / "filtered_feature_bc_matrix.h5", tmp_path)
    sf_path = tmp_path / "spatial" / "scalefactors_json.json"
    sf = json.loads(sf_path.read_text())
    del sf["tissue_lowres_scalef"], sf["tissue_hires_scalef"]
    sf_path.write_text(json.dumps(sf))
    with pytest.warns(UserWarning) as rec:
        a = read_visium(tmp_path)
    msgs = sorted(str(r.message) for r in rec)
    assert msgs == [
        f"tissue_{k}_image.png: no tissue_{k}_scalef in scalefactors_json.json; the image is "
        "not used"
        for k in ("hires", "lowres")
    ]
    lib = a.uns["tissuegraph"]["library_id"]
    assert a.uns["spatial"][lib]["images"] == {}
    with pytest.raises(InputError, match=f"no image for library .*read from {tmp_path}"):
        open_image(a)
