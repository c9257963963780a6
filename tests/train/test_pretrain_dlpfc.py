"""Short CPU pretraining on a real DLPFC slide (151673, 256-gene panel, H&E patches)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tissuegraph.graph import schema as S

STEPS = 200
K = 30


@pytest.fixture(scope="module")
def dlpfc_graphs(dlpfc_dir, priors_dir, tmp_path_factory):
    from tissuegraph.config import load_config
    from tissuegraph.graph.config import BuildConfig, SlideSpec
    from tissuegraph.graph.pipeline import build_graphs

    out = tmp_path_factory.mktemp("dlpfc_graphs")
    cfg = load_config(
        BuildConfig,
        None,
        [
            f"out_dir={out}",
            "panel.n_top=256",
            "patches.enabled=true",
            "patches.crop_px=32",
            f"priors.tf_targets={priors_dir / 'collectri_human.csv'}",
            f"priors.pathways={priors_dir / 'progeny_human_top100.tsv'}",
        ],
    )
    cfg.slides = [SlideSpec(name="151673", format="visium", path=str(dlpfc_dir))]
    build_graphs(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def dlpfc_run(dlpfc_graphs, tmp_path_factory):
    from tissuegraph.train.loop import pretrain

    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("dlpfc_run")
    cfg = {
        "graphs": str(dlpfc_graphs),
        "run_dir": str(run),
        "seed": 0,
        "model": {
            "hidden_dim": 32,
            "expr_hidden_dim": 64,
            "proj_dim": 32,
            "dropout": 0.0,
            "image_encoder": {"name": "test_resnet"},
        },
        "train": {
            "max_steps": STEPS,
            "batch_spots": 256,
            "lr": 2e-3,
            "warmup_steps": 10,
            "log_every": 1,
            "eval_every": STEPS,
            "ckpt_every": 0,
            "val_fraction": 0.2,
            "tensorboard": False,
        },
    }
    ckpt = pretrain(cfg, progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return ckpt, rows


TERMS = ("contrastive", "patch_region", "localisation", "masked_expression")


def test_every_term_finite_and_loss_decreases(dlpfc_run):
    _, rows = dlpfc_run
    assert len(rows) == STEPS
    for t in ("loss", *TERMS):
        v = np.array([r[t] for r in rows])
        assert np.isfinite(v).all(), t
    loss = np.array([r["loss"] for r in rows])
    assert loss[-K:].mean() < 0.85 * loss[:K].mean()
    me = np.array([r["masked_expression"] for r in rows])
    assert me[-K:].mean() < 0.6 * me[:K].mean()


def test_heldout_retrieval_above_chance(dlpfc_run):
    # Top-1 on ~700 held-out queries rests on a handful of hits (chance ~3), so it swings with
    # the platform's floating point; the rank fraction uses every candidate of every query
    # (chance 0.5, standard error ~0.011 at this size) and is what the test holds to.
    _, rows = dlpfc_run
    ev = rows[-1]
    print("held-out retrieval", ev["val_retrieval_auc"], ev["val_retrieval_top1"])
    # Measured 0.57 after 200 CPU steps; 0.53 is ~3 standard errors above chance.
    assert ev["val_retrieval_auc"] > 0.53


def test_heldout_localisation_above_chance(dlpfc_run):
    # The child patch is scored against the 3x3 cells of its parent's image; on tiles never
    # trained on this must beat both chance (1/9) and always guessing the most frequent cell.
    _, rows = dlpfc_run
    last = rows[-1]
    print("held-out localisation", last["val_localisation_acc"], last["val_localisation_majority"])
    assert last["val_localisation_acc"] > 0.25
    assert last["val_localisation_acc"] > last["val_localisation_majority"]


def test_embed_real_slide(dlpfc_run, dlpfc_graphs):
    from tissuegraph.graph.storage import load_graph, read_manifest
    from tissuegraph.train.checkpoint import load_model
    from tissuegraph.train.infer import embed_graph, predict_graph

    ckpt, _ = dlpfc_run
    model, info = load_model(ckpt)
    man = read_manifest(dlpfc_graphs)
    assert info["genes"] == man["genes"] and info["build_config"] == man["build_config"]
    g = load_graph(dlpfc_graphs / man["slides"][0]["file"])
    n = g[S.SPOT].num_nodes
    e = embed_graph(model, g, kind="fused", batch_spots=1024, device="cpu")
    assert e.shape == (n, 32) and np.isfinite(e).all() and (np.abs(e).sum(1) > 0).all()
    p = predict_graph(model, g, batch_spots=1024, device="cpu")
    x = g[S.SPOT][S.X].float().numpy()
    # image + neighbour prediction beats the per-gene mean on the slide's spots
    base = ((x - x.mean(0)) ** 2).mean()
    assert ((p - x) ** 2).mean() < base
