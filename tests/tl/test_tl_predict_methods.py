"""Image -> expression on HER2ST: the stored probe and the image-only decoder
(``tl.predict_expression(method=...)``), and frozen patch features from local weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tissuegraph import io, tl
from tissuegraph.errors import ConfigError, InputError

ROOT = Path(__file__).resolve().parents[2]


def _spec(her2st_dir, name):
    from tissuegraph.graph.config import SlideSpec

    d = her2st_dir / name
    return SlideSpec(
        name=name,
        format="st",
        counts=str(d / "counts.tsv.gz"),
        spots=str(d / "spots.tsv"),
        image=str(d / "he.jpg"),
    )


@pytest.fixture(scope="module")
def run(her2st_dir, tmp_path_factory):
    """Two sections (C3, C4) built with the shipped HER2ST build config (small crops, 30
    genes) and pretrained with the shipped recipe for a few steps."""
    from omegaconf import OmegaConf

    from tissuegraph.config import load_config
    from tissuegraph.graph.config import BuildConfig
    from tissuegraph.graph.pipeline import build_graphs
    from tissuegraph.train.config import PretrainConfig
    from tissuegraph.train.loop import pretrain

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("her2st_predict")
    cfg = load_config(
        BuildConfig,
        ROOT / "configs" / "build" / "her2st.yaml",
        [
            f"out_dir={tmp / 'graphs'}",
            "panel.n_top=30",
            "patches.crop_px=32",
            "patches.encoder.input_px=32",
            "priors.tf_targets=null",
            "priors.pathways=null",
            "priors.ligand_receptor=null",
        ],
    )
    cfg.slides = [OmegaConf.structured(_spec(her2st_dir, n)) for n in ("C3", "C4")]
    build_graphs(cfg, progress=False)
    pcfg = load_config(
        PretrainConfig,
        ROOT / "configs" / "pretrain" / "her2st.yaml",
        [
            f"graphs={tmp / 'graphs'}",
            f"run_dir={tmp / 'run'}",
            "train.max_steps=6",
            "train.eval_every=3",
            "train.threads=1",
            "train.device=cpu",
            "train.tensorboard=false",
        ],
    )
    last = pretrain(pcfg, progress=False)
    return Path(last)


@pytest.fixture(scope="module")
def c2(her2st_dir):
    d = her2st_dir / "C2"
    return io.read_st(d / "counts.tsv.gz", d / "spots.tsv", d / "he.jpg", library_id="C2")


def test_probe_fitted_stored_and_reloaded(run):
    from tissuegraph.train.checkpoint import load_model

    best = run.parent / "best.pt"
    assert best.is_file()  # train.keep_best: val_image_expression
    for path in (run, best):
        _, info = load_model(path)
        probe = info["probe"]
        assert probe is not None and probe["slides"] == ["C3", "C4"]
        k, g = probe["coef"].shape
        assert g == len(info["genes"]) == 30
        assert probe["components"].shape == (k, probe["n_features"])
        assert probe["alpha"] in probe["alphas"] and len(probe["cv_mse"]) == len(probe["alphas"])
        assert probe["n_spots"] > 300
        assert all(torch.isfinite(probe[key]).all() for key in ("coef", "intercept", "sd"))


def test_both_methods_predict_heldout_section(run, c2):
    from tissuegraph.train.checkpoint import load_model
    from tissuegraph.train.probe import probe_features

    image_only = c2.copy()
    image_only.X = image_only.X * 0
    preds = {}
    for method in ("decoder", "probe"):
        pred = tl.predict_expression(image_only, str(run), device="cpu", method=method)
        assert pred.shape == (c2.n_obs, 30)
        assert np.isfinite(pred.X).all()
        assert pred.uns["tg_predict"]["params"]["method"] == method
        preds[method] = np.asarray(pred.X)
    assert not np.allclose(preds["decoder"], preds["probe"])
    # the probe's features of a slide do not depend on its expression
    model, info = load_model(run)
    from tissuegraph.graph.pipeline import build_slide_graph

    g = build_slide_graph(c2, info["build_config"], genes=info["genes"], slide_name="C2")
    g0 = build_slide_graph(image_only, info["build_config"], genes=info["genes"], slide_name="C2")
    np.testing.assert_allclose(probe_features(model, g), probe_features(model, g0), atol=1e-5)
    # scored against the measured expression when it is there
    scored = tl.predict_expression(c2, str(run), device="cpu", method="probe")
    assert "pearson_r" in scored.var and np.isfinite(scored.uns["tg_predict"]["mean_pearson_r"])


def test_bad_method_is_a_clear_error(run, c2):
    with pytest.raises(InputError, match=r"method must be one of \['auto', 'decoder', 'probe'\]"):
        tl.predict_expression(c2, str(run), device="cpu", method="ridge")


def test_patch_encoder_from_local_weights_file(tmp_path):
    """Frozen patch features from a local checkpoint file (as UNI / Virchow / H-optimus
    weights are given): classifier keys are dropped, every backbone weight is loaded."""
    import timm

    from tissuegraph.graph.config import EncoderSpec
    from tissuegraph.graph.patches import encode_patches, load_encoder
    from tissuegraph.io.image import SlideImage

    torch.manual_seed(123)
    ref = timm.create_model("resnet10t", pretrained=False)  # with its classifier
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    spec = EncoderSpec(name="resnet10t", checkpoint_path=str(path), colour_stats=True)
    model, _, _ = load_encoder(spec)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref.state_dict()[k])
    # seeded random init without weights: two builds encode with the same network
    a, _, _ = load_encoder(EncoderSpec(name="resnet10t"))
    b, _, _ = load_encoder(EncoderSpec(name="resnet10t"))
    torch.testing.assert_close(a.conv1[0].weight, b.conv1[0].weight)
    assert not torch.equal(a.conv1[0].weight, model.conv1[0].weight)
    # features + 12 colour statistics per crop
    rng = np.random.default_rng(0)
    img = SlideImage.from_array(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8), 1.0)
    feat = encode_patches(img, np.array([[50.0, 50.0], [120.0, 90.0]]), 40, spec, input_px=32)
    assert feat.shape == (2, model.num_features + 12) and np.isfinite(feat).all()
    # a file that does not fit, and a missing file: one-line configuration errors
    torch.save({"conv1.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="do not fit"):
        load_encoder(EncoderSpec(name="resnet10t", checkpoint_path=str(tmp_path / "bad.pth")))
    with pytest.raises(ConfigError, match="not found"):
        load_encoder(EncoderSpec(name="resnet10t", checkpoint_path=str(tmp_path / "no.pth")))


def test_colour_statistics_values():
    from tissuegraph.graph.patches import COLOUR_STATS, colour_statistics

    crops = np.zeros((2, 4, 4, 3), np.uint8)
    crops[0, ..., 0] = 255  # pure red: hue 0, saturation 1, value 1
    crops[1] = 128  # grey: saturation 0
    st = colour_statistics(crops)
    assert st.shape == (2, len(COLOUR_STATS))
    d = dict(zip(COLOUR_STATS, st[0]))
    assert d["mean_r"] == pytest.approx(1.0) and d["mean_g"] == 0.0
    assert d["mean_h"] == pytest.approx(0.0) and d["mean_s"] == pytest.approx(1.0)
    assert dict(zip(COLOUR_STATS, st[1]))["mean_s"] == 0.0
    assert np.all(st[:, 6:] == 0)  # constant crops: no spread
