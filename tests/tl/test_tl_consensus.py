"""Consensus niches: the majority vote of several clusterings (tl.consensus_labels and
tl.niches with a list of representations), on label vectors and on DLPFC 151673."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from tissuegraph import io, tl
from tissuegraph.errors import InputError


def _permuted(labels, k, seed):
    return np.random.default_rng(seed).permutation(k)[labels]


def test_consensus_undoes_label_permutations():
    base = np.random.default_rng(0).integers(0, 4, 300)
    parts = [base, _permuted(base, 4, 1), _permuted(base, 4, 2)]
    labels, support, ari = tl.consensus_labels(parts, 4)
    assert adjusted_rand_score(base, labels) == 1.0
    assert (support == 1.0).all()
    assert np.allclose(ari, 1.0)


def test_majority_outvotes_noisy_partitions():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 5, 400)
    noisy = []
    for s in (3, 4):
        x = _permuted(base, 5, s).copy()
        hit = rng.random(400) < 0.4
        x[hit] = rng.integers(0, 5, hit.sum())
        noisy.append(x)
    parts = [noisy[0], base, _permuted(base, 5, 5), noisy[1], _permuted(base, 5, 6)]
    labels, support, ari = tl.consensus_labels(parts, 5)
    assert adjusted_rand_score(base, labels) == 1.0  # three exact copies out of five
    assert support.min() >= 0.6 and support.max() == 1.0
    assert ari.shape == (5, 5) and ari[1, 2] == 1.0 and ari[0, 3] < 0.9


def test_two_partitions_tie_to_the_reference():
    a = np.array([0, 0, 1, 1, 2, 2])
    b = np.array([1, 1, 0, 2, 2, 2])
    labels, support, _ = tl.consensus_labels([a, b], 3)
    ref = a if adjusted_rand_score(a, b) >= 0 else b
    assert adjusted_rand_score(ref, labels) == 1.0
    assert set(support.tolist()) <= {0.5, 1.0}


def test_consensus_labels_rejects_bad_partitions():
    with pytest.raises(ValueError, match="at least one"):
        tl.consensus_labels([], 3)
    with pytest.raises(ValueError, match="0..2"):
        tl.consensus_labels([np.array([0, 1, 3])], 3)
    with pytest.raises(ValueError, match="one length"):
        tl.consensus_labels([np.array([0, 1]), np.array([0, 1, 2])], 3)


@pytest.fixture(scope="module")
def dlpfc3(dlpfc_dir):
    a = io.read_visium(dlpfc_dir, library_id="151673")
    layers = pd.read_csv(dlpfc_dir / "layers.tsv", sep="\t", index_col=0)["layer"]
    a.obs["layer"] = layers.reindex(a.obs_names).to_numpy()
    for h in (1, 2, 3):
        tl.aggregate_neighbors(a, n_hops=h, key_added=f"X_agg{h}")
    return a


def test_niches_vote_of_several_representations(dlpfc3, tmp_path):
    a = dlpfc3.copy()
    reps = ["X_agg1", "X_agg2", "X_agg3"]
    tl.niches(a, n_niches=7, use_rep=reps, n_init=3)
    m = pd.notna(a.obs["layer"]).to_numpy()
    ari = adjusted_rand_score(a.obs["layer"][m], a.obs["tg_niche"][m])
    singles = []
    for i, r in enumerate(reps):
        b = a.copy()
        tl.niches(b, n_niches=7, use_rep=r, n_init=3, random_state=i)
        singles.append(adjusted_rand_score(b.obs["layer"][m], b.obs["tg_niche"][m]))
    print(f"DLPFC 151673 ARI: vote {ari:.3f}, single representations {np.round(singles, 3)}")
    assert ari >= 0.40 and ari >= min(singles)
    assert a.obs["tg_niche"].nunique() == 7
    sup = a.obs["tg_niche_support"].to_numpy()
    assert sup.dtype == np.float32 and sup.min() > 0.3 and sup.max() == 1.0
    assert np.allclose(sup * 3, np.round(sup * 3), atol=1e-5)  # thirds of three votes
    info = a.uns["tg_niche"]
    assert info["params"]["use_rep"] == reps
    assert info["consensus"]["use_rep"] == reps
    assert 0.0 < info["consensus"]["pairwise_ari"] <= 1.0
    assert info["consensus"]["support_mean"] == pytest.approx(float(sup.mean()), rel=1e-5)
    a.write_h5ad(tmp_path / "a.h5ad")
    back = __import__("anndata").read_h5ad(tmp_path / "a.h5ad")
    assert list(back.uns["tg_niche"]["consensus"]["use_rep"]) == reps
    # a later single-representation run drops the stale support column
    tl.niches(a, n_niches=7, use_rep="X_agg3", n_init=3)
    assert "tg_niche_support" not in a.obs and "consensus" not in a.uns["tg_niche"]


def test_niches_consensus_bad_input(dlpfc3):
    a = dlpfc3
    with pytest.raises(InputError, match="leiden"):
        tl.niches(a.copy(), n_niches=7, use_rep=["X_agg1", "X_agg2"], method="leiden")
    with pytest.raises(InputError, match="twice"):
        tl.niches(a.copy(), n_niches=7, use_rep=["X_agg1", "X_agg1"])
    with pytest.raises(InputError, match="non-empty list"):
        tl.niches(a.copy(), n_niches=7, use_rep=[])
    with pytest.raises(InputError, match="X_missing"):
        tl.niches(a.copy(), n_niches=7, use_rep=["X_agg1", "X_missing"])
