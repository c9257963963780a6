"""Tests of the synthetic slide simulator (layout, ground truth, GRN, image, scale)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree

from tissuegraph.datasets import simulate_slide
from tissuegraph.errors import InputError

ROW_PITCH = 100.0 * math.sqrt(3) / 2


@pytest.fixture(scope="session")
def slide():
    return simulate_slide(900, n_genes=120, n_niches=5, seed=3)


@pytest.fixture(scope="session")
def slide_noimg():
    return simulate_slide(900, n_genes=120, n_niches=5, seed=3, image=False)


def _baseline_ari(adata, n_pcs: int = 15, rounds: int = 2, seed: int = 0) -> float:
    """PCA of log-normalised counts, averaged over the 6 lattice neighbours, then a GMM."""
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score
    from sklearn.mixture import GaussianMixture

    X = adata.X.toarray()
    X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    Z = PCA(n_pcs, random_state=seed).fit_transform(X - X.mean(0))
    pairs = cKDTree(adata.obsm["spatial_um"]).query_pairs(101.0, output_type="ndarray")
    n = Z.shape[0]
    A = sp.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    A = (A + A.T + sp.eye(n)).tocsr()
    A = sp.diags(1.0 / np.asarray(A.sum(1)).ravel()) @ A
    for _ in range(rounds):
        Z = A @ Z
    k = len(adata.obs["true_niche"].cat.categories)
    labels = GaussianMixture(k, covariance_type="full", random_state=seed, n_init=2).fit_predict(Z)
    return adjusted_rand_score(adata.obs["true_niche"].cat.codes, labels)


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------
def test_visium_hex_lattice(slide):
    obs = slide.obs
    r, c = obs["array_row"].to_numpy(), obs["array_col"].to_numpy()
    assert np.all(c % 2 == r % 2), "row r holds the columns of parity r % 2"
    assert r.min() in (0, 1) and c.min() in (0, 1)
    xy = slide.obsm["spatial_um"]
    # x follows the column (50 µm a step), y the row (86.6 µm a step)
    np.testing.assert_allclose(np.diff(xy[:, 0] - 50.0 * c), 0.0, atol=1e-9)
    np.testing.assert_allclose(np.diff(xy[:, 1] - ROW_PITCH * r), 0.0, atol=1e-9)
    tree = cKDTree(xy)
    assert tree.query_pairs(99.0).__len__() == 0, "no two spots closer than 100 µm"
    nbrs = tree.query_ball_point(xy, 100.5)
    deg = np.array([len(x) - 1 for x in nbrs])
    present = set(zip(r.tolist(), c.tolist()))
    ring = [(0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1)]
    interior = np.array(
        [all((ri + dr, ci + dc) in present for dr, dc in ring) for ri, ci in zip(r, c)]
    )
    assert interior.mean() > 0.7
    assert np.all(deg[interior] == 6)
    assert np.all(deg <= 6)
    assert np.all(obs["in_tissue"] == 1)
    assert obs_names_unique(slide)


def obs_names_unique(adata) -> bool:
    return adata.obs_names.is_unique and adata.var_names.is_unique


def test_scalefactors_and_image_geometry(slide):
    mpp = slide.uns["tissuegraph"]["microns_per_pixel"]
    assert mpp == 2.0
    lib = slide.uns["spatial"]["synthetic"]
    sf = lib["scalefactors"]
    assert sf["spot_diameter_fullres"] * mpp == pytest.approx(55.0)
    assert sf["tissue_hires_scalef"] == 1.0
    np.testing.assert_allclose(slide.obsm["spatial"] * mpp, slide.obsm["spatial_um"])
    hires, low = lib["images"]["hires"], lib["images"]["lowres"]
    assert hires.dtype == np.uint8 and hires.ndim == 3 and hires.shape[2] == 3
    H, W = hires.shape[:2]
    xy = slide.obsm["spatial"]
    r = sf["spot_diameter_fullres"] / 2
    assert xy[:, 0].min() - r > 0 and xy[:, 1].min() - r > 0
    assert xy[:, 0].max() + r < W and xy[:, 1].max() + r < H
    s = sf["tissue_lowres_scalef"]
    assert abs(low.shape[0] - H * s) <= 1 and abs(low.shape[1] - W * s) <= 1
    assert max(low.shape[:2]) <= 600
    tg = slide.uns["tissuegraph"]
    assert tg["platform"] == "synthetic" and tg["grid"] == "hex"
    assert tg["spot_diameter_um"] == 55.0 and tg["spot_spacing_um"] == 100.0
    assert tg["library_id"] == "synthetic"
    # tissue is stained, the glass around it is near white
    assert hires[:5, :5].mean() > 230
    x, y = np.rint(xy[:50]).astype(int).T
    assert hires[y, x].mean() < 215


def test_other_resolution_and_library_id():
    a = simulate_slide(200, n_genes=60, microns_per_pixel=1.0, library_id="demo", seed=2)
    lib = a.uns["spatial"]["demo"]
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(55.0)
    H, W = lib["images"]["hires"].shape[:2]
    assert W >= a.obsm["spatial"][:, 0].max() and H >= a.obsm["spatial"][:, 1].max()
    np.testing.assert_allclose(a.obsm["spatial"], a.obsm["spatial_um"])


# ---------------------------------------------------------------------------------------------
# counts and ground truth
# ---------------------------------------------------------------------------------------------
def test_counts_and_var(slide):
    X = slide.X
    assert sp.isspmatrix_csr(X) and X.dtype == np.float32
    assert X.shape == (900, 120)
    assert np.all(X.data > 0) and np.all(X.data == np.round(X.data))
    assert slide.var_names[0] == "TF0" and "G0" in slide.var_names
    n_tf = int(slide.var["is_tf"].sum())
    assert n_tf == 6 * 3
    assert list(slide.var["gene_ids"]) == list(slide.var_names)
    totals = np.asarray(X.sum(1)).ravel()
    assert totals.min() > 0
    assert totals.std() / totals.mean() > 0.2, "library sizes vary"


def test_ground_truth(slide):
    sim = slide.uns["simulation"]
    props = slide.obsm["true_proportions"]
    assert isinstance(props, pd.DataFrame)
    assert list(props.columns) == list(sim["cell_types"]) and props.shape == (900, 6)
    np.testing.assert_allclose(props.to_numpy().sum(1), 1.0, atol=1e-5)
    niche = slide.obs["true_niche"]
    assert isinstance(niche.dtype, pd.CategoricalDtype)
    assert list(niche.cat.categories) == list(sim["niches"])
    counts = niche.value_counts()
    assert (counts > 20).all(), counts
    # niches are spatially coherent: most lattice neighbours share their niche
    pairs = cKDTree(slide.obsm["spatial_um"]).query_pairs(100.5, output_type="ndarray")
    codes = niche.cat.codes.to_numpy()
    assert (codes[pairs[:, 0]] == codes[pairs[:, 1]]).mean() > 0.85
    # proportions follow the niche mixtures
    mix = np.asarray(sim["niche_mixtures"])
    mean_by_niche = props.groupby(codes).mean().to_numpy()
    assert np.abs(mean_by_niche - mix[np.sort(np.unique(codes))]).max() < 0.12
    assert slide.obsm["true_tf_activity"].shape == (900, 18)
    assert slide.obsm["true_pathway_activity"].shape == (900, sim["params"]["n_modules"])
    assert len(sim["twin_niches"]) == 2


def test_grn_table_and_drive(slide):
    grn = slide.uns["simulation"]["grn"]
    src, dst = np.asarray(grn["source"]), np.asarray(grn["target"])
    w = np.asarray(grn["weight"], dtype=float)
    assert len(src) == len(dst) == len(w) > 50
    assert set(src) <= set(slide.uns["simulation"]["tfs"])
    assert set(dst) <= set(slide.var_names) and not any(t.startswith("TF") for t in dst)
    assert np.all(np.abs(w) > 0) and (w < 0).any() and (w > 0).any()
    # targets correlate with their TF's activity with the sign of the edge
    X = slide.X.toarray()
    logx = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    act = slide.obsm["true_tf_activity"]
    tf_index = {t: i for i, t in enumerate(slide.uns["simulation"]["tfs"])}
    gene_index = {g: i for i, g in enumerate(slide.var_names)}
    n_reg = pd.Series(dst).value_counts()
    agree, total = 0, 0
    for s_, t_, w_ in zip(src, dst, w):
        if n_reg[t_] != 1 or abs(w_) < 0.6:
            continue
        r = np.corrcoef(act[:, tf_index[s_]], logx[:, gene_index[t_]])[0, 1]
        agree += np.sign(r) == np.sign(w_)
        total += 1
    assert total >= 10
    assert agree / total > 0.85, (agree, total)
    # a TF's own mRNA follows its activity
    r_tf = [np.corrcoef(act[:, i], logx[:, gene_index[t]])[0, 1] for t, i in tf_index.items()]
    assert np.median(r_tf) > 0.3


def test_pathway_table(slide):
    pw = slide.uns["simulation"]["pathways"]
    assert len(pw["source"]) == len(pw["target"]) == len(pw["weight"]) > 0
    assert set(pw["source"]) == set(slide.uns["simulation"]["pathway_names"])


# ---------------------------------------------------------------------------------------------
# image
# ---------------------------------------------------------------------------------------------
def _spot_colours(adata) -> np.ndarray:
    img = adata.uns["spatial"]["synthetic"]["images"]["hires"].astype(np.float32)
    half = int(adata.uns["spatial"]["synthetic"]["scalefactors"]["spot_diameter_fullres"] / 2)
    xy = np.rint(adata.obsm["spatial"]).astype(int)
    out = np.empty((xy.shape[0], 3))
    for i, (x, y) in enumerate(xy):
        out[i] = img[y - half : y + half, x - half : x + half].reshape(-1, 3).mean(0)
    return out


def test_image_colour_depends_on_cell_type(slide):
    rgb = _spot_colours(slide)
    P = slide.obsm["true_proportions"].to_numpy()
    design = np.column_stack([P[:, :-1], np.ones(len(P))])
    coef, *_ = np.linalg.lstsq(design, rgb, rcond=None)
    resid = rgb - design @ coef
    r2 = 1 - resid.var(0) / rgb.var(0)
    assert r2.max() > 0.15, r2
    # a shuffled assignment explains nothing
    rng = np.random.default_rng(0)
    Ps = P[rng.permutation(len(P))]
    design = np.column_stack([Ps[:, :-1], np.ones(len(P))])
    coef, *_ = np.linalg.lstsq(design, rgb, rcond=None)
    r2s = 1 - (rgb - design @ coef).var(0) / rgb.var(0)
    assert r2s.max() < 0.05


def test_image_pinkish_with_purple_nuclei(slide):
    img = slide.uns["spatial"]["synthetic"]["images"]["hires"]
    xy = np.rint(slide.obsm["spatial"]).astype(int)
    x0, y0 = xy[len(xy) // 2]
    patch = img[y0 - 40 : y0 + 40, x0 - 40 : x0 + 40].reshape(-1, 3).astype(int)
    bright = patch[patch.sum(1) > np.percentile(patch.sum(1), 70)]
    dark = patch[patch.sum(1) < np.percentile(patch.sum(1), 5)]
    r, g, b = bright.mean(0)
    assert r > g and b > g, "eosin background is pink"
    r, g, b = dark.mean(0)
    assert b > r and b > g, "nuclei are purple-blue"


# ---------------------------------------------------------------------------------------------
# determinism, options, scale
# ---------------------------------------------------------------------------------------------
def test_determinism(slide, slide_noimg):
    again = simulate_slide(900, n_genes=120, n_niches=5, seed=3)
    assert (again.X != slide.X).nnz == 0
    np.testing.assert_array_equal(
        again.uns["spatial"]["synthetic"]["images"]["hires"],
        slide.uns["spatial"]["synthetic"]["images"]["hires"],
    )
    # the image does not change the expression
    assert (slide_noimg.X != slide.X).nnz == 0
    assert slide_noimg.uns["spatial"]["synthetic"]["images"] == {}
    other = simulate_slide(900, n_genes=120, n_niches=5, seed=4, image=False)
    assert (other.X != slide.X).nnz > 0


def test_h5ad_roundtrip(slide, tmp_path):
    import anndata as ad

    path = tmp_path / "s.h5ad"
    slide.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert (back.X != slide.X).nnz == 0
    assert back.uns["simulation"]["grn"]["source"][0] == slide.uns["simulation"]["grn"]["source"][0]
    assert back.uns["spatial"]["synthetic"]["images"]["hires"].shape == (
        slide.uns["spatial"]["synthetic"]["images"]["hires"].shape
    )


def test_bad_arguments():
    with pytest.raises(InputError, match="difficulty"):
        simulate_slide(100, difficulty=1.5)
    with pytest.raises(InputError, match="n_genes"):
        simulate_slide(100, n_genes=20)
    with pytest.raises(InputError, match="n_spots"):
        simulate_slide(3)


def test_small_configurations():
    a = simulate_slide(150, n_genes=40, n_niches=1, n_cell_types=2, n_modules=0, image=False)
    assert a.obs["true_niche"].nunique() == 1
    b = simulate_slide(150, n_genes=40, n_niches=2, n_cell_types=3, image=False)
    assert b.obs["true_niche"].nunique() == 2


def test_large_slide_without_image():
    n = 100_000
    a = simulate_slide(n, n_genes=50, image=False, seed=1)
    assert a.shape == (n, 50)
    r, c = a.obs["array_row"].to_numpy(), a.obs["array_col"].to_numpy()
    assert np.all(c % 2 == r % 2)
    assert a.obs_names.is_unique
    assert a.X.nnz > 0 and a.X.dtype == np.float32
    assert a.obs["true_niche"].nunique() == 5


def test_difficulty_knob_and_baseline():
    easy = _baseline_ari(simulate_slide(1200, n_genes=150, image=False, difficulty=0.0))
    default = _baseline_ari(simulate_slide(1200, n_genes=150, image=False))
    hard = _baseline_ari(simulate_slide(1200, n_genes=150, image=False, difficulty=1.0))
    assert easy > hard
    assert 0.3 < default < 0.95, default
