"""Every plot draws and saves a non-trivial image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tissuegraph import pl, tl
from tissuegraph.datasets import simulate_slide
from tissuegraph.errors import InputError


@pytest.fixture(scope="module")
def sim():
    a = simulate_slide(500, n_niches=4, seed=1)
    tl.aggregate_neighbors(a, n_hops=1)
    tl.niches(a, use_rep="X_aggregated", k_range=(3, 5), n_repeats=2, n_init=2)
    tl.nhood_enrichment(a, cluster_key="tg_niche")
    tl.niche_composition(a, niche_key="tg_niche", proportions="true_proportions")
    a.obs["true_niche"] = a.obs["true_niche"].astype("category")
    return a


def _check_png(path, min_colors=20):
    assert path.is_file() and path.stat().st_size > 5_000
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert len(np.unique(img.reshape(-1, 3), axis=0)) >= min_colors  # not blank


def test_save_niche_figures(sim, tmp_path):
    paths = pl.save_niche_figures(sim, tmp_path / "figs")
    names = sorted(p.name for p in paths)
    assert names == ["composition.png", "nhood_enrichment.png", "niches.png", "stability.png"]
    for p in paths:
        _check_png(p)


def test_niche_maps_over_image_and_pdf(sim, tmp_path):
    fig = pl.niche_maps(sim, ["tg_niche", "true_niche"], save=tmp_path / "maps.png")
    assert len(fig.axes) == 2
    _check_png(tmp_path / "maps.png", min_colors=200)  # the H&E-like image is drawn
    pl.niches(sim, image=False, save=tmp_path / "n.pdf")
    assert (tmp_path / "n.pdf").read_bytes()[:4] == b"%PDF"


def test_training_curves(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as fh:
        for s in range(50):
            fh.write(json.dumps({"step": s, "loss": 3 - s / 30, "contrastive": 2 - s / 40}) + "\n")
        fh.write('{"step": 50, "lo')  # a partially written last line is skipped
    fig = pl.training_curves(run, save=tmp_path / "curves.png")
    assert len([a for a in fig.axes if a.has_data()]) == 2
    _check_png(tmp_path / "curves.png", min_colors=5)
    with pytest.raises(InputError, match="run tissuegraph pretrain first"):
        pl.training_curves(tmp_path / "empty")


def test_expression_maps(sim, tmp_path):
    from anndata import AnnData

    genes = list(sim.var_names[:3])
    pred = AnnData(np.random.default_rng(0).random((sim.n_obs, 3)).astype(np.float32))
    pred.var_names = genes
    pred.obs_names = sim.obs_names
    pred.obsm["spatial"] = sim.obsm["spatial"]
    pred.uns["spatial"] = sim.uns["spatial"]
    pred.layers["measured"] = pred.X * 0.5 + 0.1
    pred.var["pearson_r"] = [0.9, 0.5, 0.2]
    fig = pl.expression_maps(pred, n_genes=2, save=tmp_path / "expr.png")
    assert len([a for a in fig.axes if a.get_title()]) == 4
    _check_png(tmp_path / "expr.png")


def test_plot_errors_name_the_function(sim):
    with pytest.raises(InputError, match="run tissuegraph.tl.niches"):
        pl.niches(sim, niche_key="nope")
    b = sim.copy()
    del b.uns["tg_niche_nhood_enrichment"]
    with pytest.raises(InputError, match="run tissuegraph.tl.nhood_enrichment"):
        pl.nhood_enrichment(b, cluster_key="tg_niche")
    with pytest.raises(InputError, match=r"\.png, \.pdf"):
        pl.niches(sim, save="x.gif")
