"""h5ad round trip, format detection and SlideSpec dispatch."""

from __future__ import annotations

import numpy as np
import pytest

from tissuegraph.errors import ConfigError, InputError
from tissuegraph.graph.config import SlideSpec
from tissuegraph.io import (
    detect_format,
    open_image,
    read_any,
    read_h5ad,
    read_slide,
    read_visium,
    write_h5ad,
)


@pytest.fixture(scope="module")
def toy(data_dir):
    return read_visium(data_dir / "visium_toy")


def test_roundtrip(tmp_path, toy):
    p = tmp_path / "out" / "toy.h5ad"
    toy.uns["extra"] = {"a_path": tmp_path, "tuple": (1, 2), "none": None, "names": ["x", "y"]}
    try:
        write_h5ad(toy, p)
    finally:
        del toy.uns["extra"]
    assert p.exists() and not [f for f in p.parent.iterdir() if f.name.endswith(".tmp")]
    b = read_h5ad(p)
    assert b.shape == toy.shape and (b.X != toy.X).nnz == 0
    np.testing.assert_array_equal(b.obsm["spatial_um"], toy.obsm["spatial_um"])
    assert b.uns["tissuegraph"]["image_path"] is None
    assert b.uns["tissuegraph"]["microns_per_pixel"] == toy.uns["tissuegraph"]["microns_per_pixel"]
    lib = toy.uns["tissuegraph"]["library_id"]
    np.testing.assert_array_equal(
        b.uns["spatial"][lib]["images"]["lowres"], toy.uns["spatial"][lib]["images"]["lowres"]
    )
    assert b.uns["extra"]["a_path"] == str(tmp_path)
    assert toy.uns["tissuegraph"]["image_path"] is None  # the input is unchanged
    with open_image(b) as img:
        assert img.crop(b.obsm["spatial"][:4], 200, 8).shape == (4, 8, 8, 3)
    assert detect_format(p) == "h5ad" and read_any(p).n_obs == toy.n_obs


def test_corrupt_h5ad(tmp_path):
    p = tmp_path / "bad.h5ad"
    p.write_bytes(b"garbage" * 50)
    with pytest.raises(InputError, match="bad.h5ad"):
        read_h5ad(p)


def test_read_any(data_dir, tmp_path):
    assert detect_format(data_dir / "dlpfc" / "151673") == "visium"
    assert detect_format(data_dir / "her2st" / "C2") == "st"
    st = read_any(data_dir / "her2st" / "C2")
    assert st.uns["tissuegraph"]["platform"] == "st" and st.n_obs == 187
    with pytest.raises(InputError, match="not a Space Ranger folder"):
        read_any(tmp_path)
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(InputError, match="unknown input file"):
        read_any(tmp_path / "x.csv")


def test_read_slide(data_dir, monkeypatch):
    a = read_slide(SlideSpec(name="s1", format="visium", path=str(data_dir / "visium_toy")))
    assert a.uns["tissuegraph"]["library_id"] == "s1" and a.n_obs == 100
    c2 = data_dir / "her2st" / "C2"
    b = read_slide(
        SlideSpec(
            name="c2",
            format="st",
            counts=str(c2 / "counts.tsv.gz"),
            spots=str(c2 / "spots.tsv"),
            image=str(c2 / "he.jpg"),
        )
    )
    assert b.uns["tissuegraph"]["grid"] == "square"
    with pytest.raises(ConfigError, match="format"):
        read_slide(SlideSpec(name="x", format="xenium", path="."))
    with pytest.raises(ConfigError, match="path is required"):
        read_slide(SlideSpec(name="x", format="h5ad"))

    import tissuegraph.datasets.simulate as sim
    from tissuegraph import datasets

    syn = SlideSpec(name="syn", format="synthetic", n_spots=123, seed=7)
    with pytest.raises(ConfigError, match="datasets.read_slide"):
        read_slide(syn)  # io reads files; it never imports datasets

    calls = {}

    def fake(n_spots=2000, *, seed=0, **kw):
        calls.update(n_spots=n_spots, seed=seed)
        return "slide"

    monkeypatch.setattr(sim, "simulate_slide", fake)
    assert datasets.read_slide(syn) == "slide"
    assert calls == {"n_spots": 123, "seed": 7}
    a2 = datasets.read_slide(
        SlideSpec(name="s1", format="visium", path=str(data_dir / "visium_toy"))
    )
    assert a2.n_obs == a.n_obs


# ----------------------------------------------------------------------------- what X holds
def _normalised(toy):
    import scanpy as sc

    a = toy.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return a


def test_normalised_h5ad_needs_to_be_declared(tmp_path, toy):
    p = tmp_path / "norm.h5ad"
    write_h5ad(_normalised(toy), p)
    with pytest.raises(InputError, match=r"norm.h5ad: .*non-integer.*expression='normalized'") as e:
        read_h5ad(p)
    assert "\n" not in str(e.value)
    a = read_h5ad(p, expression="normalized")
    assert a.uns["tissuegraph"]["expression"] == "normalized"
    assert read_any(p, expression="normalized").n_obs == toy.n_obs
    spec = SlideSpec(name="n", format="h5ad", path=str(p), expression="normalized")
    assert read_slide(spec).n_obs == toy.n_obs
    with pytest.raises(InputError, match="non-integer"):
        read_slide(SlideSpec(name="n", format="h5ad", path=str(p)))
    with pytest.raises(ConfigError, match=r"slides\[n\].expression = 'log'"):
        read_slide(SlideSpec(name="n", format="h5ad", path=str(p), expression="log"))
    with pytest.raises(ConfigError, match="applies to format h5ad only"):
        read_slide(SlideSpec(name="v", format="visium", path=str(p), expression="normalized"))
    with pytest.raises(InputError, match="unknown"):
        read_h5ad(p, expression="log")
    # through an OmegaConf config, as build-graphs reads it
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(SlideSpec), {"name": "n", "format": "h5ad"})
    cfg.path, cfg.expression = str(p), "normalized"
    assert read_slide(cfg).n_obs == toy.n_obs


def test_what_x_holds_is_recorded_in_the_file(tmp_path, toy):
    """An AnnData read with expression='normalized' and written back says so in the file, so
    reading it again needs no argument; a build config must still declare it."""
    p = tmp_path / "norm.h5ad"
    write_h5ad(_normalised(toy), p)
    a = read_h5ad(p, expression="normalized")
    write_h5ad(a, tmp_path / "again.h5ad")
    assert read_h5ad(tmp_path / "again.h5ad").uns["tissuegraph"]["expression"] == "normalized"
    with pytest.raises(InputError, match="non-integer"):
        read_h5ad(tmp_path / "again.h5ad", expression="raw")
    with pytest.raises(InputError, match="non-integer"):
        read_slide(SlideSpec(name="n", format="h5ad", path=str(tmp_path / "again.h5ad")))


def _with_value(toy, value):
    a = _normalised(toy)
    X = a.X.toarray()
    X[2, 3] = value
    a.X = X
    return a


def test_nan_refused_even_when_normalised(tmp_path, toy):
    a = _with_value(toy, np.nan)
    p = tmp_path / "bad.h5ad"
    write_h5ad(a, p)
    with pytest.raises(InputError, match="bad.h5ad: 1 invalid value.*1 NaN") as e:
        read_h5ad(p, expression="normalized")
    assert f"spot {a.obs_names[2]!r}, gene {a.var_names[3]!r}" in str(e.value)
    with pytest.raises(InputError, match="bad.h5ad: .* invalid value.*1 NaN, .* non-integer"):
        read_h5ad(p)


def test_negative_values(tmp_path, toy):
    """Normalised values may be negative (scaled, predicted) when read, but a graph is built
    from non-negative expression only."""
    a = _with_value(toy, -1.0)
    p = tmp_path / "neg.h5ad"
    write_h5ad(a, p)
    assert read_h5ad(p, expression="normalized").n_obs == toy.n_obs
    with pytest.raises(InputError, match="neg.h5ad: .*1 negative"):
        read_h5ad(p)
    spec = SlideSpec(name="n", format="h5ad", path=str(p), expression="normalized")
    with pytest.raises(InputError, match=r"neg.h5ad: 1 invalid value\(s\) .*\(1 negative\)"):
        read_slide(spec)


def test_slide_columns_checked(tmp_path, toy):
    a = toy.copy()
    a.obs["in_tissue"] = a.obs["in_tissue"].to_numpy() * 0 + 1
    a.obs.iloc[3, a.obs.columns.get_loc("in_tissue")] = -1
    write_h5ad(a, tmp_path / "t.h5ad")
    with pytest.raises(InputError, match=r"t.h5ad: obs\['in_tissue'\] holds values other than"):
        read_h5ad(tmp_path / "t.h5ad")
    b = toy.copy()
    b.obs["array_row"] = b.obs["array_row"].astype(float)
    b.obs.iloc[0, b.obs.columns.get_loc("array_row")] = 2.5
    write_h5ad(b, tmp_path / "r.h5ad")
    with pytest.raises(InputError, match=r"obs\['array_row'\] holds values that are not whole"):
        read_h5ad(tmp_path / "r.h5ad")


def test_nan_coordinates_refused(tmp_path, toy):
    a = toy.copy()
    a.obsm["spatial"] = a.obsm["spatial"].copy()
    a.obsm["spatial"][5, 0] = np.nan
    p = tmp_path / "nanpos.h5ad"
    write_h5ad(a, p)
    with pytest.raises(InputError, match=r"nanpos.h5ad: obsm\['spatial'\] holds NaN"):
        read_h5ad(p)
