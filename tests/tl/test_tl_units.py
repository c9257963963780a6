"""Fast tl tests on a small simulated slide, incl. every function's bad-input errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from tissuegraph import tl
from tissuegraph.datasets import simulate_slide
from tissuegraph.errors import InputError


@pytest.fixture(scope="module")
def sim():
    a = simulate_slide(600, n_niches=4, seed=3, image=False)
    tl.aggregate_neighbors(a, n_hops=1)
    return a


def test_auto_k_picks_a_stable_k(sim):
    a = sim.copy()
    tl.niches(a, use_rep="X_aggregated", k_range=(2, 7), n_repeats=3, n_init=3)
    st = a.uns["tg_niche"]["stability"]
    assert st["k"] == list(range(2, 8))
    assert len(st["stability"]) == 6 and np.isfinite(st["stability"]).all()
    k = a.uns["tg_niche"]["n_niches"]
    assert k == st["k"][int(np.argmax(st["stability"]))]
    assert 3 <= k <= 6  # 4 simulated niches


@pytest.mark.parametrize("method", ["gmm", "kmeans", "leiden"])
def test_methods_recover_simulated_niches(sim, method):
    a = sim.copy()
    tl.niches(a, n_niches=4, method=method, use_rep="X_aggregated")
    ari = adjusted_rand_score(a.obs["true_niche"], a.obs["tg_niche"])
    assert a.obs["tg_niche"].nunique() == 4 or method == "leiden"
    assert ari > 0.3, (method, ari)
    assert a.uns["tg_niche"]["params"]["method"] == method


def test_gmm_is_reproducible(sim):
    a, b = sim.copy(), sim.copy()
    tl.niches(a, n_niches=4, use_rep="X_aggregated", random_state=5)
    tl.niches(b, n_niches=4, use_rep="X_aggregated", random_state=5)
    assert (a.obs["tg_niche"] == b.obs["tg_niche"]).all()


def test_copy_leaves_input_untouched(sim):
    a = sim.copy()
    out = tl.niches(a, n_niches=3, use_rep="X_aggregated", copy=True)
    assert "tg_niche" not in a.obs and "tg_niche" in out.obs


def test_composition_from_true_proportions(sim):
    a = sim.copy()
    a.obs["tg_niche"] = a.obs["true_niche"].astype(str).astype("category")
    comp = tl.niche_composition(a, niche_key="tg_niche", proportions="true_proportions")
    assert comp.shape == (4, len(a.uns["simulation"]["cell_types"]))
    np.testing.assert_allclose(comp.sum(axis=1), 1.0)
    mix = np.asarray(a.uns["simulation"]["niche_mixtures"], dtype=float)
    # recovered compositions correlate with the simulator's niche mixtures
    order = [a.uns["simulation"]["niches"].index(n) for n in comp.index]
    r = np.corrcoef(comp.to_numpy().ravel(), mix[order].ravel())[0, 1]
    assert r > 0.8


def test_neighbors_knn_and_radius(sim):
    a = sim.copy()
    tl.spatial_neighbors(a, method="knn", k=4)
    deg = np.asarray(a.obsp["spatial_connectivities"].sum(1)).ravel()
    assert deg.min() >= 4
    tl.spatial_neighbors(a, method="radius", radius=150.0)
    assert np.median(np.asarray(a.obsp["spatial_connectivities"].sum(1)).ravel()) == 6
    tl.spatial_neighbors(a, rings=2)
    assert np.median(np.asarray(a.obsp["spatial_connectivities"].sum(1)).ravel()) == 18


def _err(fn, match):
    with pytest.raises(InputError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_bad_inputs_name_the_fix(sim, tmp_path):
    a = sim.copy()
    _err(lambda: tl.niches(a), r"obsm\['X_tissuegraph'\] not found: run tissuegraph.tl.embed")
    _err(lambda: tl.niches(a, use_rep="X_aggregated", method="dbscan"), "method must be one of")
    _err(lambda: tl.niches(a, use_rep="X_aggregated", n_niches=0), "n_niches must be")
    _err(lambda: tl.niches(np.zeros((3, 3))), "expected an AnnData")
    _err(lambda: tl.niches(a, use_rep="X_aggregated", k_range=(1, 3)), "k_range")
    _err(
        lambda: tl.nhood_enrichment(a, cluster_key="tg_niche"),
        r"obs\['tg_niche'\] not found: run tissuegraph.tl.niches",
    )
    _err(lambda: tl.nhood_enrichment(a, cluster_key="true_niche", n_perms=1), "n_perms")
    _err(
        lambda: tl.nhood_enrichment(a, cluster_key="true_niche", connectivity_key="nope"),
        "spatial_neighbors",
    )
    _err(lambda: tl.niche_markers(a, niche_key="tg_niche"), "run tissuegraph.tl.niches")
    _err(lambda: tl.niche_composition(a, niche_key="true_niche"), "exactly one of")
    _err(
        lambda: tl.niche_composition(a, niche_key="true_niche", proportions="props"),
        r"obsm\['props'\] not found",
    )
    pw = pd.DataFrame({"source": ["P"], "target": ["NOTAGENE"], "weight": [1.0]})
    _err(lambda: tl.pathway_activity(a, pw), "no pathway has")
    _err(lambda: tl.pathway_activity(a, pd.DataFrame({"a": [1]})), "source, target")
    lr = pd.DataFrame({"ligand": ["NOPE"], "receptor": ["NADA"]})
    _err(lambda: tl.ligand_receptor(a, lr, niche_key="true_niche"), "no ligand-receptor pair")
    _err(lambda: tl.ligand_receptor(a, lr, niche_key="tg_niche"), "run tissuegraph.tl.niches")
    _err(lambda: tl.aggregate_neighbors(a, n_hops=-1), "n_hops")
    _err(lambda: tl.aggregate_neighbors(a, use_rep="X_nope"), r"obsm\['X_nope'\] not found")
    _err(lambda: tl.spatial_neighbors(a, method="radius"), "radius > 0")
    ckpt = tmp_path / "missing.pt"
    _err(lambda: tl.embed(a, ckpt), "run tissuegraph.train.loop.pretrain")
    _err(lambda: tl.embed(a, ckpt, kind="text"), "kind must be one of")
    _err(lambda: tl.predict_expression(a, ckpt), "run tissuegraph.train.loop.pretrain")
    _err(lambda: tl.predict_expression(str(tmp_path / "nope.jpg"), ckpt), "not found")
    _err(lambda: tl.explain(a, "0", checkpoint=ckpt), r"obs\['tg_niche'\] not found")
    a.obs["tg_niche"] = a.obs["true_niche"].astype(str).astype("category")
    _err(lambda: tl.explain(a, "99", checkpoint=ckpt), "niche '99' not found")
    _err(lambda: tl.measured_vs_predicted(a), "predict_expression")


def test_niches_scale_follows_the_embedding_record(sim):
    """scale=None standardises only a representation that tl.embed marked as LayerNorm-shaped."""
    from types import SimpleNamespace

    from tissuegraph.tl._model import scale_for_clustering

    rng = np.random.default_rng(0)
    a = sim.copy()
    # one informative wide feature, many noisy narrow ones: scaling changes the clustering
    z = np.c_[
        10.0 * (a.obs["true_niche"].cat.codes.to_numpy()[:, None]), rng.normal(size=(a.n_obs, 8))
    ]
    a.obsm["X_rep"] = z.astype(np.float32)
    tl.niches(a, n_niches=3, use_rep="X_rep", key_added="d")
    assert a.uns["d"]["params"]["scale"] is True  # no record: standardised, as before
    a.uns["X_rep"] = {"scale_for_clustering": False}
    tl.niches(a, n_niches=3, use_rep="X_rep", key_added="r")
    assert a.uns["r"]["params"]["scale"] is False  # the embedding's record
    tl.niches(a, n_niches=3, use_rep="X_rep", key_added="e", scale=True)
    assert a.uns["e"]["params"]["scale"] is True  # an explicit value wins

    graph = SimpleNamespace(node_types=["spot", "patch_0"])
    linear = {"norm": False, "expr_hidden_dim": 0}
    assert not scale_for_clustering(SimpleNamespace(cfg=linear, fuse=None), graph, "fused")
    assert scale_for_clustering(SimpleNamespace(cfg=linear, fuse=object()), graph, "fused")
    assert not scale_for_clustering(SimpleNamespace(cfg=linear, fuse=object()), graph, "expression")
    assert scale_for_clustering(
        SimpleNamespace(cfg={**linear, "norm": True}, fuse=None), graph, "fused"
    )
    assert scale_for_clustering(
        SimpleNamespace(cfg={**linear, "expr_hidden_dim": 64}, fuse=None), graph, "fused"
    )
