"""Niche composition on HER2+ breast cancer (legacy ST) with the authors' deconvolution."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tissuegraph import io, tl


@pytest.fixture(scope="module")
def c2(her2st_dir):
    d = her2st_dir / "C2"
    adata = io.read_st(d / "counts.tsv.gz", d / "spots.tsv", d / "he.jpg", library_id="C2")
    props = pd.read_csv(d / "celltype_proportions_major.tsv", sep="\t", index_col=0)
    props.index = props.index.astype(str)
    adata.obsm["proportions"] = props.reindex(adata.obs_names)
    # standard spot QC: a few spots under the tissue edge hold almost no counts
    keep = np.asarray(adata.X.sum(axis=1)).ravel() >= 500
    return adata[keep].copy()


def test_composition_from_deconvolution(c2):
    a = c2
    joined = a.obsm["proportions"].notna().all(axis=1).mean()
    assert joined > 0.9  # spot ids "XxY" of counts, spot table and proportions agree
    tl.aggregate_neighbors(a, n_hops=1, n_pcs=20)
    # a PCA-based representation: keep its variance ordering (scale=False)
    tl.niches(a, n_niches=4, use_rep="X_aggregated", scale=False)
    comp = tl.niche_composition(a, niche_key="tg_niche", proportions="proportions")
    assert comp.shape == (4, 8)
    np.testing.assert_allclose(comp.sum(axis=1), 1.0, atol=1e-6)
    assert "Epithelial" in comp.columns
    stored = a.uns["tg_niche_composition"]
    pd.testing.assert_frame_equal(stored["composition"], comp)
    assert sum(stored["n_spots"].values()) == int(a.obsm["proportions"].notna().all(axis=1).sum())

    # expression niches separate tumour (epithelial) from stroma/immune regions: the share
    # of the epithelial proportion's variance explained by the niches (eta^2, from the
    # per-niche means and sizes) is far above that of shuffled labels
    def eta2(b, comp):
        p = b.obsm["proportions"]["Epithelial"].to_numpy()
        n = pd.Series(b.uns["tg_niche_composition"]["n_spots"]).reindex(comp.index).to_numpy()
        means = tl.niche_composition(
            b, niche_key="tg_niche", proportions="proportions", normalize=False
        )["Epithelial"].to_numpy()
        ok = np.isfinite(p)
        return float((n * (means - p[ok].mean()) ** 2).sum() / ((p[ok] - p[ok].mean()) ** 2).sum())

    obs = eta2(a, comp)
    rng = np.random.default_rng(0)
    null = []
    for _ in range(10):
        b = a.copy()
        b.obs["tg_niche"] = pd.Categorical(rng.permutation(b.obs["tg_niche"].to_numpy()))
        null.append(eta2(b, comp))
    print(
        f"her2st C2: niches explain {obs:.2f} of the epithelial-proportion variance "
        f"(shuffled labels: max {max(null):.3f}); composition:\n{comp.round(2)}"
    )
    assert obs > 0.2 and obs > 5 * max(null)


def test_composition_from_obs_columns(c2):
    a = c2.copy()
    cols = list(a.obsm["proportions"].columns)
    for c in cols:
        a.obs[c] = a.obsm["proportions"][c].to_numpy()
    a.obs["tg_niche"] = pd.Categorical((a.obs["array_row"] > a.obs["array_row"].median()).map(str))
    comp = tl.niche_composition(a, niche_key="tg_niche", proportions=cols, normalize=False)
    assert comp.shape == (2, 8)
    assert np.isfinite(comp.to_numpy()).all()


def test_pseudo_spots_cover_the_tissue(her2st_dir, c2):
    # the ST array of C2 has ~187 spots under tissue on a 200 µm grid; a 200 µm hex
    # lattice over the tissue detected in he.jpg should give a similar number of spots
    mpp = c2.uns["tissuegraph"]["microns_per_pixel"]
    ad = tl.pseudo_spots(
        her2st_dir / "C2" / "he.jpg", spacing_um=200.0, microns_per_pixel=mpp, genes=["ERBB2"]
    )
    assert 0.6 * c2.n_obs < ad.n_obs < 1.6 * c2.n_obs
    assert ad.X.shape == (ad.n_obs, 1) and ad.X.nnz == 0
    assert set(ad.obsm) >= {"spatial", "spatial_um"}
    assert ((ad.obs["array_row"] % 2) == (ad.obs["array_col"] % 2)).all()
    # pseudo-spots lie where the real spots are: each real spot has one within 200 µm
    from sklearn.neighbors import NearestNeighbors

    d, _ = (
        NearestNeighbors(n_neighbors=1).fit(ad.obsm["spatial_um"]).kneighbors(c2.obsm["spatial_um"])
    )
    assert np.median(d) < 150 and (d < 300).mean() > 0.9
