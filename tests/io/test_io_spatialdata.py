"""SpatialData <-> AnnData (the ``tissuegraph[spatialdata]`` extra), and tl on a SpatialData.

Marked ``spatialdata`` (deselected by default): ``uv run --extra spatialdata pytest -m
spatialdata``. The missing-dependency test runs in the default suite.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tissuegraph import io, tl
from tissuegraph.errors import InputError, MissingDependencyError
from tissuegraph.graph.coords import microns_per_pixel, positions_um

needs_spatialdata = pytest.mark.spatialdata


@pytest.fixture(scope="module")
def toy(data_dir):
    return io.read_visium(data_dir / "visium_toy", library_id="toy")


def _hires(adata):
    lib = adata.uns["tissuegraph"]["library_id"]
    return adata.uns["spatial"][lib]["images"]["hires"]


def test_missing_spatialdata_names_the_extra(toy, monkeypatch):
    monkeypatch.setitem(sys.modules, "spatialdata", None)  # import fails
    with pytest.raises(MissingDependencyError) as e:
        io.to_spatialdata(toy)
    msg = str(e.value)
    assert "pip install 'tissuegraph[spatialdata]'" in msg
    assert "uv sync --extra spatialdata" in msg and "\n" not in msg


@needs_spatialdata
@pytest.mark.filterwarnings("ignore:zarr v3 autosharding")
def test_round_trip_keeps_counts_positions_scale_and_image(toy, tmp_path):
    import spatialdata as sd

    sdata = io.to_spatialdata(toy)
    assert set(sdata.shapes) == {"toy"} and set(sdata.tables) == {"table"}
    assert set(sdata.images) == {"toy_hires_image", "toy_lowres_image"}
    # circles of the physical spot diameter (55 µm) in full-resolution pixels
    mpp = toy.uns["tissuegraph"]["microns_per_pixel"]
    np.testing.assert_allclose(sdata.shapes["toy"]["radius"].to_numpy(), 27.5 / mpp)
    sdata.write(tmp_path / "toy.zarr")
    for s in (sdata, sd.read_zarr(tmp_path / "toy.zarr")):
        back = io.read_spatialdata(s)
        assert list(back.obs_names) == list(toy.obs_names)
        assert list(back.var_names) == list(toy.var_names)
        assert (back.X != toy.X).nnz == 0
        np.testing.assert_allclose(back.obsm["spatial"], toy.obsm["spatial"])
        np.testing.assert_allclose(positions_um(back), positions_um(toy))
        assert microns_per_pixel(back) == pytest.approx(mpp)
        np.testing.assert_array_equal(_hires(back), _hires(toy))
        sf = back.uns["spatial"]["toy"]["scalefactors"]
        assert sf["tissue_hires_scalef"] == pytest.approx(
            toy.uns["spatial"]["toy"]["scalefactors"]["tissue_hires_scalef"]
        )
        assert "spatialdata_attrs" not in back.uns


@needs_spatialdata
def test_a_spatialdata_io_like_table_gets_microns_from_the_shapes(toy):
    # no tissuegraph keys, no scale factors in the table: spatialdata-io's Visium layout
    sdata = io.to_spatialdata(toy)
    t = sdata.tables["table"]
    del t.uns["tissuegraph"], t.uns["spatial"], t.obsm["spatial_um"], t.obsm["spatial"]
    back = io.read_spatialdata(sdata)
    np.testing.assert_allclose(back.obsm["spatial"], toy.obsm["spatial"])
    # the spot lattice gives the pixel size (as for scanpy's reader)
    assert microns_per_pixel(back) == pytest.approx(microns_per_pixel(toy), rel=1e-4)
    del back.obs["array_row"]  # without it, the circles' diameter (55 µm)
    assert microns_per_pixel(back) == pytest.approx(microns_per_pixel(toy), rel=1e-6)


@needs_spatialdata
def test_missing_keys_list_the_keys_present(toy):
    sdata = io.to_spatialdata(toy)
    with pytest.raises(InputError, match=r"table_key='counts' not found; tables present: table"):
        io.read_spatialdata(sdata, table_key="counts")
    with pytest.raises(InputError) as e:
        io.read_spatialdata(sdata, image_key="he")
    assert str(e.value) == (
        "read_spatialdata: image_key='he' not found; images present: "
        "toy_hires_image, toy_lowres_image"
    )
    sdata.tables["other"] = sdata.tables["table"].copy()
    with pytest.raises(InputError, match=r"has 2 tables \(table, other\); choose one"):
        tl.niches(sdata, n_niches=2, use_rep="spatial")
    with pytest.raises(InputError, match="table_key / image_key apply to a SpatialData"):
        tl.niches(toy.copy(), table_key="table")
    with pytest.raises(InputError, match=r"got SpatialData: convert it with .*read_spatialdata"):
        tl.nhood_enrichment(sdata, cluster_key="tg_niche")


@pytest.fixture(scope="module")
def toy_checkpoint(data_dir, tmp_path_factory):
    """A real checkpoint after a few pretraining steps on visium_toy (image patches on)."""
    from omegaconf import OmegaConf

    from tissuegraph.config import load_config
    from tissuegraph.graph.config import BuildConfig, SlideSpec
    from tissuegraph.graph.pipeline import build_graphs
    from tissuegraph.train.config import PretrainConfig
    from tissuegraph.train.loop import pretrain

    tmp = tmp_path_factory.mktemp("toy_ckpt")
    cfg = OmegaConf.structured(BuildConfig)
    cfg.slides = [SlideSpec(name="toy", format="visium", path=str(data_dir / "visium_toy"))]
    cfg.out_dir = str(tmp / "graphs")
    cfg.panel.n_top = 50
    cfg.patches.sizes_um = [110.0, 330.0]
    cfg.patches.crop_px = 8
    build_graphs(cfg, progress=False)
    steps = ["train.max_steps=3", "train.device=cpu", "train.batch_spots=128"]
    small = ["train.eval_every=0", "train.ckpt_every=0", "train.tensorboard=false"]
    small += ["model.hidden_dim=16", "model.expr_hidden_dim=32", "model.proj_dim=16"]
    pcfg = load_config(
        PretrainConfig, None, [f"graphs={tmp / 'graphs'}", f"run_dir={tmp / 'run'}"] + steps + small
    )
    torch.manual_seed(0)
    pretrain(pcfg, progress=False)
    return tmp / "run" / "checkpoints" / "last.pt"


@needs_spatialdata
def test_tl_on_spatialdata_equals_tl_on_anndata(toy, toy_checkpoint):
    a = toy.copy()
    tl.embed(a, toy_checkpoint, device="cpu")
    tl.niches(a, n_niches=3)
    sdata = io.to_spatialdata(toy)
    assert tl.embed(sdata, toy_checkpoint, device="cpu") is None
    assert tl.niches(sdata, n_niches=3) is None
    t = sdata.tables["table"]
    np.testing.assert_array_equal(t.obsm["X_tissuegraph"], a.obsm["X_tissuegraph"])
    assert t.uns["X_tissuegraph"]["checkpoint_hash"] == a.uns["X_tissuegraph"]["checkpoint_hash"]
    assert list(t.obs["tg_niche"]) == list(a.obs["tg_niche"])
    assert list(t.uns["tg_niche_colors"]) == list(a.uns["tg_niche_colors"])
    assert "images" not in t.uns["spatial"]["toy"]  # the image stays an image element
    # what tl wrote travels back to the AnnData side
    back = io.read_spatialdata(sdata)
    np.testing.assert_array_equal(back.obsm["X_tissuegraph"], a.obsm["X_tissuegraph"])
    # copy=True leaves the input alone and returns a new SpatialData
    fresh = io.to_spatialdata(toy)
    out = tl.embed(fresh, toy_checkpoint, device="cpu", copy=True)
    assert "X_tissuegraph" not in fresh.tables["table"].obsm
    np.testing.assert_array_equal(
        out.tables["table"].obsm["X_tissuegraph"], a.obsm["X_tissuegraph"]
    )
    # image -> expression: the same predictions from either input
    p_a = tl.predict_expression(toy, toy_checkpoint, device="cpu")
    p_s = tl.predict_expression(sdata, toy_checkpoint, device="cpu")
    np.testing.assert_array_equal(p_s.X, p_a.X)
    assert list(p_s.obs_names) == list(toy.obs_names)
