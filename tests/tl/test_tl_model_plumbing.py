"""embed / predict_expression / explain plumbing with a small stand-in model.

The real graph builder is used; the model is a tiny differentiable function of the spot
expression, the expression edges and the patch pixels, so these tests check the AnnData
side (graph building from the stored config, layouts, warnings, attribution bookkeeping)
independently of the trained network.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from tissuegraph import tl
from tissuegraph.datasets import simulate_slide
from tissuegraph.graph import schema as S


class StandIn(nn.Module):
    def __init__(self, n_genes: int, dim: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.expr = nn.Linear(n_genes, dim)
        self.img = nn.Linear(3, dim)
        self.head = nn.Linear(dim, n_genes)

    def embed(self, data, kind="fused"):
        x = data[S.SPOT][S.X].float()
        z = self.expr(x)
        if kind != "expression" and S.patch(0) in data.node_types:
            img = data[S.patch(0)][S.IMG].float() / 255.0
            z = z + self.img(img.mean(dim=(2, 3)))
        if S.patch(1) in data.node_types:
            img1 = data[S.patch(1)][S.IMG].float() / 255.0
            z = z + 0.1 * self.img(img1.mean(dim=(2, 3))).mean(0)
        st = data[S.SPOT_EXPRESSES_GENE]
        w = torch.zeros(x.shape[0], device=x.device).index_add(
            0, st.edge_index[0], st[S.EDGE_WEIGHT].float()
        )
        return z + 0.01 * w[:, None]


@pytest.fixture
def fake_infer(monkeypatch):
    mod = types.ModuleType("tissuegraph.train.infer")

    def embed_graph(model, data, *, kind="fused", batch_spots=None, device="cpu"):
        with torch.no_grad():
            return model.embed(data, kind=kind).cpu().numpy()

    def predict_graph(model, data, *, batch_spots=None, device="cpu", image_only=False):
        with torch.no_grad():
            return model.head(model.embed(data, kind="image")).cpu().numpy()

    mod.embed_graph = embed_graph
    mod.predict_graph = predict_graph
    monkeypatch.setitem(sys.modules, "tissuegraph.train.infer", mod)
    import tissuegraph.train as train_pkg

    monkeypatch.setattr(train_pkg, "infer", mod, raising=False)
    return mod


@pytest.fixture(scope="module")
def slide():
    return simulate_slide(150, n_genes=40, n_niches=3, n_cell_types=3, seed=2)


def _model(slide, drop=()):
    genes = [g for g in slide.var_names if g not in drop] + ["NOT_IN_SLIDE"]
    info = {
        "genes": genes,
        "pathways": [],
        "build_config": {
            "panel": {"mode": "list"},
            "patches": {"sizes_um": [110.0, 330.0], "crop_px": 8},
            "spatial": {"method": "grid", "rings": 1},
            "priors": {"pathways": "/nonexistent/progeny.tsv"},
        },
        "checkpoint_hash": "abc123",
        "step": 7,
    }
    return StandIn(len(genes)), info


def test_embed_builds_graph_and_reports_missing_genes(slide, fake_infer):
    a = slide.copy()
    model, info = _model(slide)
    with pytest.warns(UserWarning) as rec:
        tl.embed(a, (model, info), device="cpu")
    msgs = " ".join(str(r.message) for r in rec)
    assert "1 of 41 panel genes are missing" in msgs
    assert "prior tables" in msgs  # the stored prior path does not exist here
    assert a.obsm["X_tissuegraph"].shape == (150, 6)
    u = a.uns["X_tissuegraph"]
    assert u["missing_genes"] == ["NOT_IN_SLIDE"] and u["checkpoint_hash"] == "abc123"
    assert u["step"] == 7


def test_predict_keeps_layout_and_scores(slide, fake_infer):
    model, info = _model(slide)
    with pytest.warns(UserWarning):
        pred = tl.predict_expression(slide, (model, info), device="cpu")
    assert pred.shape == (150, 41)
    assert list(pred.obs_names) == list(slide.obs_names)
    np.testing.assert_array_equal(pred.obsm["spatial"], slide.obsm["spatial"])
    assert "measured" in pred.layers and np.isnan(pred.var.loc["NOT_IN_SLIDE", "pearson_r"])
    # image only: the measured expression does not enter the prediction
    b = slide.copy()
    b.X = b.X * 3
    with pytest.warns(UserWarning):
        pred2 = tl.predict_expression(b, (model, info), device="cpu")
    np.testing.assert_allclose(pred.X, pred2.X, rtol=1e-5)


def test_explain_attributes_to_genes_and_scales(slide, fake_infer):
    a = slide.copy()
    model, info = _model(slide)
    with pytest.warns(UserWarning):
        tl.embed(a, (model, info), device="cpu")
    a.obs["tg_niche"] = a.obs["true_niche"].astype(str).astype("category")
    niche = a.obs["tg_niche"].cat.categories[0]
    pw = {"source": ["P1", "P1", "P2"], "target": [info["genes"][0], info["genes"][1], "TF0"]}
    with pytest.warns(UserWarning):
        ex = tl.explain(a, niche, checkpoint=(model, info), pathways=pd.DataFrame(pw))
    assert set(ex["kind"]) == {"gene", "pathway", "scale"}
    assert (ex["kind"] == "gene").sum() == 41
    assert ex[ex["kind"] == "scale"]["feature"].str.startswith("patch_").all()
    np.testing.assert_allclose(ex.groupby("kind")["fraction"].sum(), 1.0)
    # a gene the model never sees has zero attribution
    assert ex.set_index("feature").loc["NOT_IN_SLIDE", "attribution"] == 0
    assert a.uns["tg_niche_explain"]["params"]["niche"] == niche


def test_results_survive_h5ad(slide, fake_infer, tmp_path):
    from tissuegraph import io

    a = slide.copy()
    model, info = _model(slide)
    with pytest.warns(UserWarning):
        tl.embed(a, (model, info), device="cpu")
    tl.niches(a, n_niches=3, k_range=(2, 4))
    tl.nhood_enrichment(a, cluster_key="tg_niche")
    tl.niche_composition(a, proportions="true_proportions")
    tl.niche_markers(a, n_genes=3)
    pw = pd.DataFrame({"source": ["P"] * 5, "target": list(a.var_names[:5]), "weight": 1.0})
    tl.pathway_activity(a, pw, niche_key="tg_niche")
    io.write_h5ad(a, tmp_path / "a.h5ad")
    b = io.read_h5ad(tmp_path / "a.h5ad")
    assert b.uns["X_tissuegraph"]["checkpoint_hash"] == "abc123"
    assert b.obs["tg_niche"].equals(a.obs["tg_niche"])
    np.testing.assert_allclose(
        b.uns["tg_niche_nhood_enrichment"]["zscore"], a.uns["tg_niche_nhood_enrichment"]["zscore"]
    )
