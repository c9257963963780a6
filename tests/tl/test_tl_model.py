"""embed / predict_expression / explain with a tiny pretraining on real data.

HER2ST: pretrain on sections C3 + C4 (100-gene panel chosen on them, small crops, few
steps), then use the held-out section C2 (never seen in training). DLPFC 151673: a short
pretraining, then niches on the model's embedding scored against the manual layers.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.metrics import adjusted_rand_score

from tissuegraph import io, tl
from tissuegraph.config import load_config
from tissuegraph.graph.config import BuildConfig, SlideSpec
from tissuegraph.graph.pipeline import build_graphs

HER2ST_STEPS = 30
DLPFC_STEPS = 60
# a small model and tiles sized for a short CPU run (as the demo)
SMALL = [
    "train.batch_spots=256",
    "train.warmup_steps=5",
    "train.log_every=5",
    "train.eval_every=0",
    "train.ckpt_every=0",
    "train.tensorboard=false",
    "model.hidden_dim=64",
    "model.expr_hidden_dim=128",
    "model.proj_dim=64",
]


def _pretrain(graphs, run_dir, steps):
    from tissuegraph.train.config import PretrainConfig
    from tissuegraph.train.loop import pretrain

    cfg = load_config(
        PretrainConfig,
        None,
        [f"graphs={graphs}", f"run_dir={run_dir}", f"train.max_steps={steps}", "train.device=cpu"]
        + SMALL,
    )
    torch.manual_seed(0)
    pretrain(cfg, progress=False)
    return run_dir / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def her2st_model(her2st_dir, priors_dir, tmp_path_factory):
    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("her2st_model")
    cfg = OmegaConf.structured(BuildConfig)
    cfg.slides = [
        SlideSpec(
            name=s,
            format="st",
            counts=str(her2st_dir / s / "counts.tsv.gz"),
            spots=str(her2st_dir / s / "spots.tsv"),
            image=str(her2st_dir / s / "he.jpg"),
        )
        for s in ("C3", "C4")
    ]
    cfg.out_dir = str(tmp / "graphs")
    cfg.panel.n_top = 100
    cfg.patches.sizes_um = [200.0, 600.0, 1800.0]
    cfg.patches.crop_px = 16
    cfg.priors.pathways = str(priors_dir / "progeny_human_top100.tsv")
    cfg.priors.min_pathway_genes = 2
    build_graphs(cfg, progress=False)
    ckpt = _pretrain(tmp / "graphs", tmp / "run", HER2ST_STEPS)
    d = her2st_dir / "C2"
    c2 = io.read_st(d / "counts.tsv.gz", d / "spots.tsv", d / "he.jpg", library_id="C2")
    return ckpt, c2


def test_predict_held_out_section(her2st_model):
    ckpt, c2 = her2st_model
    pred = tl.predict_expression(c2, ckpt, device="cpu")
    from tissuegraph.train.checkpoint import load_model

    _, info = load_model(ckpt)
    assert pred.shape == (c2.n_obs, len(info["genes"]))
    assert list(pred.var_names) == list(info["genes"])
    assert list(pred.obs_names) == list(c2.obs_names)
    np.testing.assert_array_equal(pred.obsm["spatial"], c2.obsm["spatial"])
    assert "spatial" in pred.uns and pred.uns["tissuegraph"]["library_id"] == "C2"
    assert np.isfinite(pred.X).all()
    assert pred.layers["measured"].shape == pred.shape
    r = pred.var["pearson_r"].to_numpy()
    assert np.isfinite(r).mean() > 0.9
    mean_r = pred.uns["tg_predict"]["mean_pearson_r"]
    print(f"her2st C2 held out, image-only prediction: mean per-gene Pearson r = {mean_r:.3f}")
    assert -1 <= mean_r <= 1
    table = tl.measured_vs_predicted(pred)
    assert table["pearson_r"].is_monotonic_decreasing


def test_predict_from_bare_image(her2st_model, her2st_dir):
    ckpt, c2 = her2st_model
    mpp = c2.uns["tissuegraph"]["microns_per_pixel"]
    pred = tl.predict_expression(
        her2st_dir / "C2" / "he.jpg", ckpt, pseudo_spacing_um=200.0, microns_per_pixel=mpp
    )
    assert 0.6 * c2.n_obs < pred.n_obs < 1.6 * c2.n_obs
    assert np.isfinite(pred.X).all() and "measured" not in pred.layers
    assert pred.obsm["spatial_um"].shape == (pred.n_obs, 2)


def test_cli_predict_bare_image_pixel_size(her2st_model, her2st_dir, tmp_path):
    """`tissuegraph predict --microns-per-pixel` sets the pixel size of a bare image: half
    the pixel size means twice the spacing in pixels, so about a quarter of the pseudo-spots."""
    from tissuegraph.cli import main

    ckpt, c2 = her2st_model
    mpp = c2.uns["tissuegraph"]["microns_per_pixel"]
    counts = []
    for factor in (1.0, 0.5):
        out = tmp_path / f"pred_{factor}.h5ad"
        argv = ["predict", "--checkpoint", str(ckpt), "-i", str(her2st_dir / "C2" / "he.jpg")]
        argv += ["-o", str(out), "--spacing-um", "200", "--microns-per-pixel", str(mpp * factor)]
        argv += ["--device", "cpu"]
        assert main(argv) == 0
        counts.append(io.read_h5ad(out).n_obs)
    assert 2.5 < counts[0] / counts[1] < 6.0


def test_cli_embed_several_checkpoints_then_consensus_niches(her2st_model, tmp_path):
    """`embed` with several checkpoints writes KEY, KEY_1, ...; `niches --use-rep` with
    several keys writes the vote and its per-spot support."""
    from tissuegraph.cli import main

    ckpt, c2 = her2st_model
    src = tmp_path / "c2.h5ad"
    io.write_h5ad(c2, src)
    emb, nic = tmp_path / "emb.h5ad", tmp_path / "niches.h5ad"
    argv = ["embed", "--checkpoint", str(ckpt), str(ckpt), "-i", str(src), "-o", str(emb)]
    assert main([*argv, "--device", "cpu"]) == 0
    a = io.read_h5ad(emb)
    np.testing.assert_array_equal(a.obsm["X_tissuegraph"], a.obsm["X_tissuegraph_1"])
    argv = ["niches", "-i", str(emb), "-o", str(nic), "--n-niches", "3"]
    argv += ["--use-rep", "X_tissuegraph", "X_tissuegraph_1", "--figdir", str(tmp_path / "f")]
    assert main(argv) == 0
    b = io.read_h5ad(nic)
    assert b.obs["tg_niche"].nunique() == 3
    sup = b.obs["tg_niche_support"].to_numpy()
    assert set(np.unique(sup).tolist()) <= {0.5, 1.0}
    assert list(b.uns["tg_niche"]["consensus"]["use_rep"]) == ["X_tissuegraph", "X_tissuegraph_1"]
    assert (tmp_path / "f" / "support.png").stat().st_size > 0  # the agreement map


def test_embed_niches_explain(her2st_model, priors_dir):
    ckpt, c2 = her2st_model
    a = c2.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl.embed(a, ckpt, device="cpu")
    z = a.obsm["X_tissuegraph"]
    assert z.shape[0] == a.n_obs and z.dtype == np.float32 and np.isfinite(z).all()
    meta = a.uns["X_tissuegraph"]
    assert meta["checkpoint_hash"] and meta["params"]["kind"] == "fused"
    assert isinstance(meta["missing_genes"], list)
    tl.niches(a, n_niches=3)
    assert a.obs["tg_niche"].nunique() == 3
    ex = tl.explain(a, "0", checkpoint=ckpt)
    assert set(ex["kind"]) >= {"gene", "scale"}
    from tissuegraph.train.checkpoint import load_model

    _, info = load_model(ckpt)
    assert sorted(ex[ex["kind"] == "gene"]["feature"]) == sorted(info["genes"])
    assert np.isfinite(ex["attribution"]).all()
    np.testing.assert_allclose(ex.groupby("kind")["fraction"].sum(), 1.0, atol=1e-6)
    if "pathway" in set(ex["kind"]):
        progeny = pd.read_csv(priors_dir / "progeny_human_top100.tsv", sep="\t")
        assert ex[ex["kind"] == "pathway"]["feature"].isin(progeny["source"]).all()


@pytest.mark.slow
def test_dlpfc_niches_on_short_pretrained_embedding(dlpfc_dir, tmp_path):
    torch.set_num_threads(2)
    cfg = OmegaConf.structured(BuildConfig)
    cfg.slides = [SlideSpec(name="151673", format="visium", path=str(dlpfc_dir))]
    cfg.out_dir = str(tmp_path / "graphs")
    cfg.panel.n_top = 500
    cfg.patches.crop_px = 16
    build_graphs(cfg, progress=False)
    ckpt = _pretrain(tmp_path / "graphs", tmp_path / "run", DLPFC_STEPS)
    a = io.read_visium(dlpfc_dir, library_id="151673")
    tl.embed(a, ckpt, device="cpu")
    tl.niches(a, n_niches=7)
    layers = pd.read_csv(dlpfc_dir / "layers.tsv", sep="\t", index_col=0)["layer"]
    lab = layers.reindex(a.obs_names)
    m = lab.notna().to_numpy()
    ari = adjusted_rand_score(lab[m], a.obs["tg_niche"][m])
    print(f"DLPFC 151673 ARI on a {DLPFC_STEPS}-step embedding (GMM K=7): {ari:.3f}")
    # Chance is 0; PCA of expression without spatial context reaches ~0.2-0.3 on this
    # section and spatial methods 0.45-0.6. A minute of CPU pretraining of a small model
    # is far from converged: the test asks for clearly layer-related niches, not more.
    assert ari >= 0.15
