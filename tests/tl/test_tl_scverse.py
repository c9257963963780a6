"""scverse-native use: AnnData in scanpy's standard Visium layout, spatial graph keys as
squidpy's, Leiden through igraph, spatial refinement of niches, shared palettes, optional
decoupler / liana backends (their absence and their plumbing; the comparisons with the real
packages are interop tests in test_tl_interop.py)."""

from __future__ import annotations

import json
import shutil
import sys
import types
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from tissuegraph import io, tl
from tissuegraph.datasets import simulate_slide
from tissuegraph.errors import InputError, MissingDependencyError
from tissuegraph.graph.coords import microns_per_pixel, positions_um
from tissuegraph.graph.spatial import spot_graph


def scanpy_visium(folder, tmp_path):
    """DLPFC 151673 read by scanpy's own Visium reader (standard layout, no tissuegraph keys).

    ``sc.read_visium`` needs both PNGs; the data folder ships only the lowres one, so a copy
    gets a hires image resampled from it at ``tissue_hires_scalef``.
    """
    import scanpy as sc

    dst = tmp_path / "151673"
    (dst / "spatial").mkdir(parents=True)
    shutil.copy(folder / "filtered_feature_bc_matrix.h5", dst)
    for f in ("scalefactors_json.json", "tissue_positions_list.csv", "tissue_lowres_image.png"):
        shutil.copy(folder / "spatial" / f, dst / "spatial")
    sf = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    low = Image.open(folder / "spatial" / "tissue_lowres_image.png")
    f = sf["tissue_hires_scalef"] / sf["tissue_lowres_scalef"]
    low.resize((round(low.width * f), round(low.height * f))).save(
        dst / "spatial" / "tissue_hires_image.png"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy points to squidpy.read.visium
        adata = sc.read_visium(dst, library_id="151673")
    adata.var_names_make_unique()
    return adata, sf


@pytest.fixture(scope="module")
def sc_dlpfc(dlpfc_dir, tmp_path_factory):
    return scanpy_visium(dlpfc_dir, tmp_path_factory.mktemp("scanpy_layout"))


def test_scanpy_layout_gives_microns(sc_dlpfc, dlpfc_dir):
    from scipy.spatial import cKDTree

    adata, sf = sc_dlpfc
    assert "tissuegraph" not in adata.uns and "spatial_um" not in adata.obsm
    ours = io.read_visium(dlpfc_dir)
    assert list(ours.obs_names) == list(adata.obs_names)
    np.testing.assert_allclose(np.asarray(ours.obsm["spatial"]), adata.obsm["spatial"])
    # the pixel size from the spot lattice, as tissuegraph's reader finds it (which fits all
    # 4,992 spots of the positions list, not only the 3,639 of the matrix)
    mpp = microns_per_pixel(adata)
    assert mpp == pytest.approx(ours.uns["tissuegraph"]["microns_per_pixel"], rel=1e-4)
    pos = positions_um(adata)
    d, _ = cKDTree(pos).query(pos, k=2)
    assert np.median(d[:, 1]) == pytest.approx(100.0, rel=0.01)  # Visium: 100 µm apart
    # this slide's spot_diameter_fullres is drawn for display: 55 µm over it is 22 % off
    assert 55.0 / sf["spot_diameter_fullres"] < 0.85 * mpp
    # without the lattice the scale factors are all there is
    bare = adata.copy()
    del bare.obs["array_row"]
    assert microns_per_pixel(bare) == pytest.approx(55.0 / sf["spot_diameter_fullres"])


def test_visium_hd_scalefactors():
    a = simulate_slide(50, seed=0, image=False)
    del a.uns["tissuegraph"]
    del a.obsm["spatial_um"]
    lib = next(iter(a.uns["spatial"]))
    sf = a.uns["spatial"][lib]["scalefactors"]
    assert microns_per_pixel(a) == pytest.approx(2.0)  # the simulated lattice: 2 µm / px
    sf["microns_per_pixel"] = 0.2737  # Visium HD: Space Ranger writes the pixel size
    assert microns_per_pixel(a) == pytest.approx(0.2737)
    del sf["microns_per_pixel"]
    sf["bin_size_um"] = 8.0  # HD without it: bin size over its width in pixels
    assert microns_per_pixel(a) == pytest.approx(8.0 / sf["spot_diameter_fullres"])
    del a.uns["spatial"]
    assert microns_per_pixel(a) is None
    with pytest.raises(InputError, match="pixel size"):
        positions_um(a, func="embed")


def test_spatial_neighbors_on_scanpy_layout_is_the_spot_graph(sc_dlpfc):
    adata, _ = sc_dlpfc
    a = adata.copy()
    tl.spatial_neighbors(a)
    conn, dist = a.obsp["spatial_connectivities"], a.obsp["spatial_distances"]
    assert a.uns["spatial_neighbors"]["connectivities_key"] == "spatial_connectivities"
    assert a.uns["spatial_neighbors"]["distances_key"] == "spatial_distances"
    p = a.uns["spatial_neighbors"]["params"]
    assert p["lattice"] == "hex" and p["unit"] == "um"
    deg = np.asarray(conn.sum(axis=1)).ravel()
    assert (conn != conn.T).nnz == 0 and conn.diagonal().sum() == 0
    assert np.median(deg) == 6 and deg.max() <= 6
    assert np.median(dist.data) == pytest.approx(100.0, rel=0.03)  # µm
    # exactly graph.spatial's edges and lengths
    rc = a.obs[["array_row", "array_col"]].to_numpy()
    ei, d_um = spot_graph(positions_um(a), method="grid", array_rc=rc, grid="hex")
    ref = sp.csr_matrix((d_um.astype(np.float64), (ei[0], ei[1])), shape=conn.shape)
    assert (conn != (ref > 0)).nnz == 0
    np.testing.assert_allclose(dist.toarray()[ei[0], ei[1]], d_um, rtol=1e-5)
    # key_added: squidpy's naming under another prefix, the default keys untouched
    tl.spatial_neighbors(a, method="knn", k=4, key_added="knn4")
    assert "knn4_connectivities" in a.obsp and "knn4_distances" in a.obsp
    assert a.uns["knn4_neighbors"]["connectivities_key"] == "knn4_connectivities"
    assert (a.obsp["spatial_connectivities"] != conn).nnz == 0


def test_build_slide_graph_on_scanpy_layout(sc_dlpfc, dlpfc_dir):
    from tissuegraph.graph import schema as S
    from tissuegraph.graph.config import BuildConfig
    from tissuegraph.graph.pipeline import build_slide_graph

    adata, _ = sc_dlpfc
    cfg = BuildConfig()
    cfg.patches.sizes_um = [55.0, 165.0]
    cfg.patches.crop_px = 8
    genes = list(adata.var_names[:50])
    g = build_slide_graph(adata, cfg, genes=genes, slide_name="151673")
    assert g[S.SPOT].num_nodes == adata.n_obs and g.meta["missing_genes"] == []
    assert g.meta["microns_per_pixel"] == pytest.approx(microns_per_pixel(adata))
    assert g.meta["grid"] == "hex"
    ei = g[S.SPOT_NEAR_SPOT].edge_index.numpy()
    assert np.median(np.bincount(ei[0])) == 6
    assert g["patch_0"].img.shape[0] == adata.n_obs  # crops from the in-memory image
    np.testing.assert_allclose(g[S.SPOT].pos.numpy(), positions_um(adata), rtol=1e-6)
    # the same spot graph as from tissuegraph's reader
    cfg.patches.enabled = False
    own = build_slide_graph(io.read_visium(dlpfc_dir), cfg, genes=genes, slide_name="151673")
    ei2 = own[S.SPOT_NEAR_SPOT].edge_index.numpy()
    assert {tuple(e) for e in ei.T} == {tuple(e) for e in ei2.T}


def test_leiden_igraph_on_a_real_slide(dlpfc_dir):
    a = io.read_visium(dlpfc_dir)
    tl.aggregate_neighbors(a, n_hops=2, n_top_genes=1000, n_pcs=20)
    tl.niches(a, method="leiden", n_niches=7, use_rep="X_aggregated", scale=False)
    u = a.uns["tg_niche"]
    assert u["algorithm"] == "leiden (igraph)"
    assert u["params"]["method"] == "leiden" and u["resolution"] > 0
    assert abs(u["n_niches"] - 7) <= 1
    layers = pd.read_csv(dlpfc_dir / "layers.tsv", sep="\t", index_col=0)["layer"]
    truth = layers.reindex(a.obs_names)
    m = truth.notna().to_numpy()
    ari = adjusted_rand_score(truth[m], a.obs["tg_niche"][m])
    print(f"DLPFC 151673 ARI (2-hop aggregation, Leiden igraph): {ari:.3f}")
    assert ari > 0.2
    # deterministic for a seed
    b = a.copy()
    tl.niches(b, method="leiden", n_niches=7, use_rep="X_aggregated", scale=False)
    assert (a.obs["tg_niche"] == b.obs["tg_niche"]).all()


# ----------------------------------------------------------------------------- refinement
@pytest.fixture(scope="module")
def sim():
    a = simulate_slide(600, n_niches=4, seed=3, image=False)
    tl.aggregate_neighbors(a, n_hops=0, n_pcs=10)  # expression only: spatially noisy labels
    return a


def test_refine_is_off_by_default_and_reported_separately(sim):
    a = sim.copy()
    kw = {"n_niches": 4, "use_rep": "X_aggregated", "n_init": 3, "scale": False}
    tl.niches(a, **kw)
    assert "tg_niche_refined" not in a.obs and "refined" not in a.uns["tg_niche"]
    assert a.uns["tg_niche"]["params"]["refine"] == 0
    raw = a.obs["tg_niche"].copy()

    tl.niches(a, **kw, refine=6)
    assert (a.obs["tg_niche"] == raw).all()  # the clustering itself is unchanged
    ref = a.obs["tg_niche_refined"]
    assert list(ref.cat.categories) == list(raw.cat.categories)
    info = a.uns["tg_niche"]["refined"]
    assert info["key"] == "tg_niche_refined" and info["k"] == 6
    assert info["n_changed"] == int((ref != raw).sum()) > 0
    assert a.uns["tg_niche"]["params"]["refine"] == 6
    assert list(a.uns["tg_niche_refined_colors"]) == list(a.uns["tg_niche_colors"])
    truth = a.obs["true_niche"]
    before, after = adjusted_rand_score(truth, raw), adjusted_rand_score(truth, ref)
    print(f"simulated slide ARI: {before:.3f} -> {after:.3f} after refinement")
    assert after > before + 0.02  # smoothing helps on spatially coherent niches (0.26 -> 0.31)

    tl.niches(a, **kw)  # refine off again
    assert "tg_niche_refined" not in a.obs and "tg_niche_refined_colors" not in a.uns


def test_refine_labels_majority_and_ties():
    # five spots on a line, 1 nearest neighbour each side (k=2)
    pos = np.array([[0.0, 0], [1, 0], [2, 0], [3, 0], [4, 0]])
    codes = np.array([0, 1, 0, 1, 1])
    out = tl._niches.refine_labels(codes, pos, 2)
    # spot 1 sees 0,1,0 -> 0; spot 2 sees 1,0,1 -> 1; spot 0 sees 0,1 (tie) -> keeps 0
    assert out.tolist() == [0, 0, 1, 1, 1]
    codes = np.array([0, -1, 0, 1, 1])  # unlabelled spots neither vote nor change
    assert tl._niches.refine_labels(codes, pos, 2).tolist() == [0, -1, 0, 1, 1]


def test_refine_needs_positions(sim):
    a = sim.copy()
    del a.obsm["spatial"], a.obsm["spatial_um"]
    with pytest.raises(InputError, match="refine needs spot positions"):
        tl.niches(a, n_niches=3, use_rep="X_aggregated", refine=4)
    with pytest.raises(InputError, match="refine must be an integer"):
        tl.niches(sim.copy(), n_niches=3, use_rep="X_aggregated", refine=-1)


# ----------------------------------------------------------------------------- palettes
def test_niche_colors_shared_with_scanpy(sim):
    import matplotlib
    import scanpy as sc
    from matplotlib.collections import EllipseCollection
    from matplotlib.colors import to_hex

    from tissuegraph import pl

    matplotlib.use("Agg")
    a = sim.copy()
    tl.niches(a, n_niches=4, use_rep="X_aggregated", n_init=3)
    colors = list(a.uns["tg_niche_colors"])
    assert len(colors) == 4 and all(c.startswith("#") for c in colors)

    def drawn(ax):
        (coll,) = [c for c in ax.collections if isinstance(c, EllipseCollection)]
        fc = [to_hex(c) for c in coll.get_facecolor()]
        codes = a.obs["tg_niche"].cat.codes.to_numpy()
        return {int(k): fc[int(np.flatnonzero(codes == k)[0])] for k in np.unique(codes)}

    ax = pl.niches(a, image=False)
    assert drawn(ax) == dict(enumerate(colors))
    # a user's palette (scanpy's convention) is what both libraries draw
    a.uns["tg_niche_colors"] = ["#000000", "#ff0000", "#00ff00", "#0000ff"]
    ax = pl.niches(a, image=False)
    assert drawn(ax) == dict(enumerate(a.uns["tg_niche_colors"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ax = sc.pl.spatial(a, color="tg_niche", img_key=None, spot_size=55, show=False)[0]
    assert list(a.uns["tg_niche_colors"]) == ["#000000", "#ff0000", "#00ff00", "#0000ff"]
    legend = {t.get_text(): to_hex(h.get_facecolor()) for t, h in _legend(ax)}
    assert legend == dict(zip(["0", "1", "2", "3"], a.uns["tg_niche_colors"]))
    # a palette too short for the categories is replaced and written back (as scanpy does)
    a.uns["tg_niche_colors"] = ["#000000"]
    pl.niches(a, image=False)
    assert len(a.uns["tg_niche_colors"]) == 4
    matplotlib.pyplot.close("all")


def _legend(ax):
    leg = ax.get_legend()
    return zip(leg.get_texts(), leg.legend_handles)


# ----------------------------------------------------------------------------- optional
def test_pathway_decoupler_backend_missing(sim, monkeypatch):
    monkeypatch.setitem(sys.modules, "decoupler", None)  # import fails
    genes = list(sim.var_names[:30])
    pw = pd.DataFrame({"source": ["P"] * 30, "target": genes, "weight": 1.0})
    with pytest.raises(
        MissingDependencyError, match=r"pip install 'tissuegraph\[decoupler\]'"
    ) as e:
        tl.pathway_activity(sim.copy(), pw, backend="decoupler")
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="backend must be one of"):
        tl.pathway_activity(sim.copy(), pw, backend="progeny")


def test_ulm_is_a_univariate_regression_t_value(sim):
    """ulm's score is the t-value of the slope of z-scored expression on the weights."""
    from scipy import stats

    a = sim.copy()
    rng = np.random.default_rng(0)
    genes = list(a.var_names[:40])
    pw = pd.DataFrame({"source": "P", "target": genes, "weight": rng.normal(size=40)})
    tl.pathway_activity(a, pw, method="ulm")
    x = tl._core.log_normalized(a).toarray().astype(np.float64)
    keep = x.std(axis=0) > 0
    z = (x[:, keep] - x[:, keep].mean(0)) / x[:, keep].std(0)
    w = np.zeros(a.n_vars)
    w[:40] = pw["weight"].to_numpy()
    w = w[keep]
    for i in (0, 7, 123):
        fit = stats.linregress(w, z[i])
        assert a.obsm["tg_pathways"]["P"].iloc[i] == pytest.approx(fit.slope / fit.stderr, rel=1e-4)


def test_ligand_receptor_defaults_to_liana_consensus(sim, monkeypatch, priors_dir):
    a = sim.copy()
    a.obs["tg_niche"] = a.obs["true_niche"].astype(str).astype("category")
    monkeypatch.setitem(sys.modules, "liana", None)
    with pytest.raises(MissingDependencyError, match="pip install liana"):
        tl.ligand_receptor(a, niche_key="tg_niche")
    # with liana: its shipped resource, read through liana.resource.select_resource
    genes = list(a.var_names)
    table = pd.DataFrame({"ligand": genes[:20], "receptor": genes[20:40]})
    calls = []

    def select_resource(name):
        calls.append(name)
        return table

    liana = types.ModuleType("liana")
    resource = types.ModuleType("liana.resource")
    resource.select_resource = select_resource
    liana.resource = resource
    monkeypatch.setitem(sys.modules, "liana", liana)
    monkeypatch.setitem(sys.modules, "liana.resource", resource)
    res = tl.ligand_receptor(a, niche_key="tg_niche", n_perms=5, min_frac=0.0)
    assert calls == ["consensus"]
    assert set(res["ligand"]) <= set(table["ligand"])
    assert a.uns["tg_niche_ligand_receptor"]["params"]["lr_table"] == "liana consensus"
