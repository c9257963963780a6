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

    import tissuegraph.datasets as ds

    calls = {}

    def fake(n_spots=2000, *, seed=0, **kw):
        calls.update(n_spots=n_spots, seed=seed)
        return "slide"

    monkeypatch.setattr(ds, "simulate_slide", fake, raising=False)
    assert read_slide(SlideSpec(name="syn", format="synthetic", n_spots=123, seed=7)) == "slide"
    assert calls == {"n_spots": 123, "seed": 7}
