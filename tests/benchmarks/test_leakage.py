"""Leakage guards of the benchmarks: held-out sections never shape the panel, the scaling or
the pretraining data."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import domains_dlpfc as dom  # noqa: E402
import image_to_expression_her2st as her  # noqa: E402
from _common import build_graph_dir, check_training_slides  # noqa: E402


@pytest.fixture(scope="session")
def dlpfc_pair(data_dir):
    from tissuegraph.io import read_visium

    return {s: read_visium(data_dir / "dlpfc" / s, library_id=s) for s in ("151673", "151674")}


def _altered(adata, seed=0):
    """The same section with its counts shuffled across spots and genes and rescaled."""
    out = adata.copy()
    x = sp.csr_matrix(out.X).toarray()
    rng = np.random.default_rng(seed)
    x = rng.permuted(x, axis=0)[:, rng.permutation(x.shape[1])] * 3.0
    out.X = sp.csr_matrix(x.astype(np.float32))
    return out


def _panel_with(adatas, fit, n_top):
    from tissuegraph.config import load_config
    from tissuegraph.graph.config import BuildConfig
    from tissuegraph.graph.pipeline import select_panel

    cfg = load_config(BuildConfig)
    cfg.panel.mode = "hvg"
    cfg.panel.n_top = n_top
    cfg.panel.fit_slides = list(fit)
    return list(select_panel(adatas, cfg))


def test_panel_ignores_heldout_counts(dlpfc_pair):
    train, held = dlpfc_pair["151673"], dlpfc_pair["151674"]
    ref = dom.choose_panel({"151673": train}, 500)
    assert len(ref) == 500
    # the build's own selection, with the held-out section present but altered
    for seed in (0, 1):
        both = {"151673": train, "151674": _altered(held, seed)}
        assert _panel_with(both, ["151673"], 500) == ref
    # the check can fail: altering the training section does change the panel
    assert dom.choose_panel({"151673": _altered(train)}, 500) != ref


def test_her2st_genes_ignore_heldout():
    import anndata as ad

    from tissuegraph.datasets import simulate_slide

    a = simulate_slide(300, image=False, n_genes=80, seed=1)
    b = simulate_slide(300, image=False, n_genes=80, seed=2)
    ref = her.choose_genes({"a": a}, 20)
    assert _panel_with({"a": a, "b": _altered(b)}, ["a"], 20) == ref
    assert isinstance(a, ad.AnnData)


def test_baseline_scaling_fitted_on_training_only():
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(200, 40))
    x_test = rng.normal(loc=5.0, scale=3.0, size=(150, 40))
    model = dom.PcaModel(5).fit(x_train)
    np.testing.assert_allclose(model.mean_, x_train.mean(0))
    z1 = model.transform(x_test)
    z2 = dom.PcaModel(5).fit(x_train).transform(x_test * 1.0)
    np.testing.assert_allclose(z1, z2, rtol=1e-5)
    # the held-out section's own mean is not removed: its shift shows in the embedding
    assert abs(z1.mean()) > 0.1 or np.abs(z1.mean(0)).max() > 0.1


def test_probe_uses_training_data_only():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 30))
    y = x[:, :3] @ rng.normal(size=(3, 4)) + 0.1 * rng.normal(size=(120, 4))
    groups = np.repeat([0, 1, 2], 40)
    p1 = her.Probe(30).fit(x, y, groups)
    x_new = rng.normal(size=(25, 30))
    before = p1.predict(x_new)
    # predicting other data does not refit anything
    p1.predict(rng.normal(loc=3.0, size=(50, 30)))
    np.testing.assert_allclose(p1.predict(x_new), before)
    r = her.pearson_per_gene(y, p1.predict(x))
    assert np.all(r > 0.9)


@pytest.fixture(scope="session")
def two_synthetic(tmp_path_factory):
    from tissuegraph.datasets import simulate_slide
    from tissuegraph.graph.config import SlideSpec
    from tissuegraph.io import write_h5ad

    root = tmp_path_factory.mktemp("bench_slides")
    out = {}
    for name, seed in (("A", 3), ("B", 4)):
        adata = simulate_slide(300, image=False, n_genes=60, seed=seed, library_id=name)
        path = root / f"{name}.h5ad"
        write_h5ad(adata, path)
        adata.obs[dom.TRUTH] = adata.obs["true_niche"].astype(str).to_numpy()
        out[name] = dom.Section(name, adata, SlideSpec(name=name, format="h5ad", path=str(path)))
    return out


def test_manifest_guard(two_synthetic, tmp_path):
    a, b = two_synthetic["A"], two_synthetic["B"]
    only_a = tmp_path / "only_a"
    build_graph_dir([a.spec], only_a, n_top=30, fit_slides=["A"], patches=False)
    check_training_slides(only_a, ["A"], ["B"])
    both = tmp_path / "both"
    build_graph_dir([a.spec, b.spec], both, n_top=30, fit_slides=["A", "B"], patches=False)
    with pytest.raises(RuntimeError, match="leakage"):
        check_training_slides(both, ["A"], ["B"])
    with pytest.raises(RuntimeError, match="expected exactly"):
        check_training_slides(only_a, ["A", "B"], [])
    manifest = check_training_slides(only_a, ["A"], ["B"])
    assert manifest["build_config"]["panel"]["fit_slides"] == ["A"]


def test_transfer_never_pretrains_on_heldout(two_synthetic, tmp_path, monkeypatch):
    """Every pretraining run of the transfer protocol sees only its training section."""
    from tissuegraph.graph.storage import read_manifest

    seen = []
    real = dom.pretrain_checkpoint

    def spy(graphs, run_dir, **kw):
        seen.append(sorted(s["name"] for s in read_manifest(graphs)["slides"]))
        return real(graphs, run_dir, **kw)

    monkeypatch.setattr(dom, "pretrain_checkpoint", spy)
    s = dom.Settings(
        k=5,
        seeds=[0],
        steps=2,
        n_top=30,
        n_pcs=10,
        n_init=1,
        restarts=1,
        consensus_models=3,
        kind="expression",
        build_overrides=["patches.enabled=false"],
        trace_python=False,
    )
    runs = dom.run([two_synthetic["A"], two_synthetic["B"]], s, tmp_path)
    # one pretraining per training section and model seed (seed 0 and the consensus arm's
    # models 0-2), reused by its per-section evaluation; never on the held-out section
    assert seen == [["A"]] * 3 + [["B"]] * 3
    transfer = [r for r in runs if r["protocol"] == "transfer"]
    assert {(r["train"], r["test"], r["method"]) for r in transfer} == {
        (a, b, m) for a, b in (("A", "B"), ("B", "A")) for m in dom.METHODS
    }
    per = [r for r in runs if r["protocol"] == "per_section"]
    assert all(r["train"] == r["test"] for r in per)
    # every representation is clustered once per tl.niches(scale=...) setting
    assert len(per) == 2 * len(dom.METHODS) * len(s.scales)
    assert {r["scale"] for r in runs} == set(s.scales) == {False, True}
    for r in runs:
        assert -1.0 <= r["ari"] <= 1.0
        if r["method"] == "tissuegraph_consensus":
            assert r["models"] == [0, 1, 2] and "restart_min" not in r
        else:
            assert r["restart_min"] <= r["restart_max"]
    # the reduced run also renders: summary rows for every (protocol, direction, method)
    cols, rows, targets = dom.summarise(runs, s)
    assert len(rows) == 4 * len(dom.METHODS) * len(s.scales)
    assert len(targets) == 2 * len(dom.TG_METHODS)
    agg = [r["ari"] for r in per if r["method"] == "aggregation" and not r["scale"]]
    assert np.mean(agg) > 0.2  # the simulated niches are spatially coherent
