"""Spatial-domain objectives (local-global contrast, masked features, reconstruction) and the
leakage-safe standardisation of the expression input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tissuegraph.graph import schema as S
from tissuegraph.nn.testing import tiny_graph, write_graph_dir
from tissuegraph.train.checkpoint import load_model
from tissuegraph.train.infer import embed_graph
from tissuegraph.train.loop import Trainer, pretrain

NEW_TERMS = ("local_global", "masked_feature", "reconstruction")
OFF = {
    "contrastive": 0.0,
    "patch_region": 0.0,
    "localisation": 0.0,
    "masked_expression": 0.0,
    "local_global": 0.0,
    "masked_feature": 0.0,
    "reconstruction": 0.0,
}


@pytest.fixture(scope="module")
def std_graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("std_graphs")
    graphs = [
        tiny_graph(12, n_genes=20, n_scales=0, seed=0, slide_index=0, slide_name="fit"),
        tiny_graph(10, n_genes=20, n_scales=0, seed=5, slide_index=1, slide_name="other"),
    ]
    write_graph_dir(graphs, d, standardize=True, n_pcs=8, fit_slides=["fit"])
    return d, graphs


def _cfg(graphs, run, steps, **weights):
    obj = dict(OFF)
    obj.update(weights)
    return {
        "graphs": str(graphs),
        "run_dir": str(run),
        "seed": 1,
        "model": {"hidden_dim": 16, "expr_hidden_dim": 16, "proj_dim": 8, "conv": "gcn"},
        "objectives": obj,
        "train": {
            "max_steps": steps,
            "batch_spots": 400,
            "lr": 3e-3,
            "warmup_steps": 1,
            "log_every": 1,
            "eval_every": 0,
            "val_fraction": 0.0,
            "tensorboard": False,
        },
    }


def test_statistics_come_from_the_fit_slides_only(std_graphs):
    d, graphs = std_graphs
    st = json.loads((d / S.MANIFEST).read_text())["standardize"]
    assert st["fit_slides"] == ["fit"]
    x_fit = graphs[0][S.SPOT][S.X].float().numpy()
    np.testing.assert_allclose(st["mean"], x_fit.mean(0), rtol=1e-4, atol=1e-5)
    sd = x_fit.std(0)
    np.testing.assert_allclose(st["sd"], np.where(sd > 1e-8, sd, 1.0), rtol=1e-4, atol=1e-5)
    both = np.concatenate([x_fit, graphs[1][S.SPOT][S.X].float().numpy()])
    assert not np.allclose(st["mean"], both.mean(0), atol=1e-3)
    basis = np.asarray(st["pca"])
    assert basis.shape == (20, 8)
    np.testing.assert_allclose(basis.T @ basis, np.eye(8), atol=1e-4)


@pytest.mark.parametrize("term", NEW_TERMS)
def test_new_objective_decreases_on_a_tiny_graph(std_graphs, tmp_path, term):
    d, _ = std_graphs
    extra = {"mask_ratio": 0.3} if term == "masked_feature" else {}
    pretrain(_cfg(d, tmp_path / "run", 60, **{term: 1.0}, **extra), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r[term] for r in rows if term in r]
    assert len(vals) == 60
    assert np.mean(vals[-8:]) < 0.9 * np.mean(vals[:8]), vals


@pytest.mark.parametrize("term", NEW_TERMS)
def test_zero_weight_removes_the_term(std_graphs, tmp_path, term):
    d, _ = std_graphs
    others = {t: 1.0 for t in NEW_TERMS if t != term}
    tr = Trainer(_cfg(d, tmp_path / "run", 2, **others, mask_ratio=0.3), progress=False)
    assert term not in tr.objectives.active()
    tr.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(term not in r for r in rows)
    assert all(t in rows[-1] for t in others)


def test_embedding_reuses_the_stored_statistics(std_graphs, tmp_path):
    d, graphs = std_graphs
    ckpt = pretrain(_cfg(d, tmp_path / "run", 3, local_global=1.0), progress=False)
    st = json.loads((d / S.MANIFEST).read_text())["standardize"]
    model, _ = load_model(ckpt)
    enc = model.expr_encoder
    np.testing.assert_allclose(enc.std_mean.numpy(), st["mean"], rtol=1e-6)
    np.testing.assert_allclose(enc.std_sd.numpy(), st["sd"], rtol=1e-6)
    np.testing.assert_allclose(enc.std_basis.numpy(), np.asarray(st["pca"]), rtol=1e-6)
    # embedding the other slide uses (and does not refit) them: other statistics change it
    other = graphs[1]
    z1 = embed_graph(model, other, batch_spots=400)
    assert torch.equal(enc.std_mean, torch.tensor(st["mean"]))
    with torch.no_grad():
        enc.std_mean += 1.0
    z2 = embed_graph(model, other, batch_spots=400)
    assert not np.allclose(np.asarray(z1), np.asarray(z2), atol=1e-4)


def test_genes_a_slide_lacks_enter_as_unknown(std_graphs, tmp_path):
    """Panel genes missing from a new slide (stored as zero columns) get the training mean,
    so their standardised value is 0, not the strong signal a zero count would give."""
    from tissuegraph.train.infer import _fill_missing_genes

    d, graphs = std_graphs
    ckpt = pretrain(_cfg(d, tmp_path / "run", 2, local_global=1.0), progress=False)
    model, _ = load_model(ckpt)
    g = graphs[1].clone()
    genes = list(g.meta["genes"])
    g[S.SPOT][S.X][:, :3] = 0
    g.meta = {**g.meta, "missing_genes": genes[:3]}
    filled = _fill_missing_genes(model, g)
    z = model.expr_encoder.standardized(filled[S.SPOT][S.X])
    raw = (filled[S.SPOT][S.X].float() - model.expr_encoder.std_mean) / model.expr_encoder.std_sd
    assert torch.allclose(raw[:, :3], torch.zeros_like(raw[:, :3]), atol=1e-2)
    assert torch.equal(g[S.SPOT][S.X][:, :3], torch.zeros_like(g[S.SPOT][S.X][:, :3]))  # copy
    assert z.shape == (g[S.SPOT][S.X].shape[0], 8)
    assert np.allclose(embed_graph(model, filled), embed_graph(model, g), atol=1e-6)


def test_local_global_summary_hops(std_graphs, tmp_path):
    """A wider summary (2 hops) still trains and decreases; 0 hops is refused by name."""
    from tissuegraph.errors import ConfigError

    d, _ = std_graphs
    pretrain(_cfg(d, tmp_path / "run", 60, local_global=1.0, local_global_hops=2), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["local_global"] for r in rows if "local_global" in r]
    assert np.mean(vals[-8:]) < 0.9 * np.mean(vals[:8]), vals
    with pytest.raises(ConfigError, match="local_global_hops"):
        pretrain(
            _cfg(d, tmp_path / "bad", 2, local_global=1.0, local_global_hops=0), progress=False
        )


def test_narrow_linear_embedding_trains_and_embeds(std_graphs, tmp_path):
    """``model.out_dim`` / ``final_activation`` survive the checkpoint: the embedding of a new
    slide has ``out_dim`` columns."""
    d, graphs = std_graphs
    cfg = _cfg(d, tmp_path / "run", 3, local_global=1.0, reconstruction=1.0)
    cfg["model"].update(hidden_dim=16, out_dim=6, final_activation=False)
    ckpt = pretrain(cfg, progress=False)
    model, _ = load_model(ckpt)
    assert model.dim == 6 and model.cfg["final_activation"] is False
    z = np.asarray(embed_graph(model, graphs[1], batch_spots=400))
    assert z.shape == (graphs[1][S.SPOT].num_nodes, 6) and np.isfinite(z).all()


def test_edge_dropout_drops_spot_edges_in_training_only(std_graphs, tmp_path):
    """``model.edge_dropout`` passes messages along a random subset of the spot graph in
    training (both local-global passes share it), along every edge in eval; out of range is
    refused by name."""
    from tissuegraph.errors import ConfigError

    d, graphs = std_graphs
    cfg = _cfg(d, tmp_path / "run", 40, local_global=1.0, reconstruction=1.0)
    cfg["model"].update(edge_dropout=0.5)
    ckpt = pretrain(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["local_global"] for r in rows if "local_global" in r]
    assert np.mean(vals[-8:]) < 0.9 * np.mean(vals[:8]), vals
    model, _ = load_model(ckpt)
    g = graphs[1]
    n_edges = g[S.SPOT_NEAR_SPOT].edge_index.shape[1]
    model.train()
    torch.manual_seed(0)
    keep = model.spot_edge_keep(g)
    assert keep is not None and keep.shape == (n_edges,) and 0 < int(keep.sum()) < n_edges
    # eval: no draw, every edge; the dropped edges change the embedding
    model.eval()
    assert model.spot_edge_keep(g) is None
    with torch.no_grad():
        full = model(g)["fused"]
        assert not torch.allclose(model(g, edge_keep=keep)["fused"], full)
        assert torch.equal(model(g, edge_keep=torch.ones_like(keep))["fused"], full)
    z1 = np.asarray(embed_graph(model, g, batch_spots=400))
    z2 = np.asarray(embed_graph(model, g, batch_spots=400))
    np.testing.assert_array_equal(z1, z2)
    bad = _cfg(d, tmp_path / "bad", 2, local_global=1.0)
    bad["model"].update(edge_dropout=1.0)
    with pytest.raises(ConfigError, match="edge_dropout"):
        pretrain(bad, progress=False)
