"""SlideImage: centre correctness on every backend, lazy reads, levels, padding."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from tissuegraph.errors import InputError
from tissuegraph.io import SlideImage, open_image, read_visium

H, W = 600, 800
MARK_X, MARK_Y = 321, 207  # pixel column / row of the mark


def marked_image(mark: int = 0) -> np.ndarray:
    """Grey ramp (varies along x and y) with a red square of half-width ``mark`` at
    (MARK_X, MARK_Y)."""
    yy, xx = np.mgrid[0:H, 0:W]
    grey = (xx * 180) // W + (yy * 60) // H
    img = np.repeat(grey[..., None], 3, axis=-1).astype(np.uint8)
    img[MARK_Y - mark : MARK_Y + mark + 1, MARK_X - mark : MARK_X + mark + 1] = [255, 0, 0]
    return img


def red_centroid(crop: np.ndarray) -> tuple[float, float]:
    r = crop[..., 0].astype(float) - crop[..., 1:].astype(float).mean(-1)
    r = np.clip(r, 0, None)  # zero on the grey background
    yy, xx = np.mgrid[0 : crop.shape[0], 0 : crop.shape[1]]
    return float((xx * r).sum() / r.sum()), float((yy * r).sum() / r.sum())


WRITERS = {
    "png": ("a.png", lambda p, a: Image.fromarray(a).save(p)),
    "tiff_tiled": (
        "tiled.tif",
        lambda p, a: tifffile.imwrite(p, a, tile=(64, 64), compression="zlib", photometric="rgb"),
    ),
    "bigtiff_raw": (
        "raw.btf",
        lambda p, a: tifffile.imwrite(p, a, bigtiff=True, photometric="rgb"),
    ),
    "tiff_strips": (
        "strips.tif",
        lambda p, a: tifffile.imwrite(p, a, rowsperstrip=16, compression="zlib", photometric="rgb"),
    ),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    exact, block = marked_image(0), marked_image(6)
    out = {}
    for kind, (name, write) in WRITERS.items():
        out[kind] = (d / f"exact_{name}", d / f"block_{name}")
        write(out[kind][0], exact)
        write(out[kind][1], block)
    out["jpeg"] = d / "a.jpg"
    Image.fromarray(block).save(out["jpeg"], quality=95)
    return out, exact, block


@pytest.mark.parametrize("kind", [*WRITERS, "array"])
def test_crop_exact_and_centred(files, kind):
    paths, exact, block = files
    if kind == "array":
        img, img_block = SlideImage.from_array(exact), SlideImage.from_array(block)
    else:
        img, img_block = (SlideImage.from_file(p) for p in paths[kind])
    with img, img_block:
        assert img.shape == (H, W)
        c = np.array([[MARK_X, MARK_Y], [40.0, 30.0]])
        crops = img.crop(c, 11, 11)
        np.testing.assert_array_equal(
            crops[0], exact[MARK_Y - 5 : MARK_Y + 6, MARK_X - 5 : MARK_X + 6]
        )
        np.testing.assert_array_equal(crops[1], exact[25:36, 35:46])
        assert tuple(crops[0, 5, 5]) == (255, 0, 0)
        np.testing.assert_array_equal(img.read_region(100, 50, 130, 70), exact[50:70, 100:130])
        # downsampled (4x, from a reduced level): the mark stays at the centre
        small = img_block.crop(c[:1], 64, 16)[0]
        cx, cy = red_centroid(small)
        assert cx == pytest.approx(7.5, abs=0.15) and cy == pytest.approx(7.5, abs=0.15)
        # and off-centre by a known offset: +8 px full-res = +2 output px
        shifted = img_block.crop(c[:1] - [8, -4], 64, 16)[0]
        cx, cy = red_centroid(shifted)
        assert cx == pytest.approx(9.5, abs=0.15) and cy == pytest.approx(6.5, abs=0.15)


def test_jpeg_centre_and_draft_level(files):
    paths = files[0]
    with SlideImage.from_file(paths["jpeg"]) as img:
        crop = img.crop(np.array([[MARK_X, MARK_Y]]), 41, 41)[0]
        cx, cy = red_centroid(crop)
        assert cx == pytest.approx(20, abs=0.2) and cy == pytest.approx(20, abs=0.2)
        full_decoded = 0 in img._native_cache
        img._native_cache.clear()
        small = img.crop(np.array([[MARK_X, MARK_Y]]), 160, 20)[0]  # 8x down: draft 1/8
        assert 0 not in img._native_cache and len(img._native_cache) == 1
        cx, cy = red_centroid(small)
        assert cx == pytest.approx(9.5, abs=0.25) and cy == pytest.approx(9.5, abs=0.25)
    assert full_decoded


def test_upsampled_from_lowres_is_centred():
    exact = marked_image(1)
    scale = 0.05  # like a Visium lowres image: full res is 20x larger
    with SlideImage.from_array(exact, scale) as img:
        assert img.shape == (H * 20, W * 20)
        centre_full = np.array([[MARK_X / scale + 9.5, MARK_Y / scale + 9.5]])
        crop = img.crop(centre_full, 200, 41)[0]  # 10 lowres px -> 41 px
        cx, cy = red_centroid(crop)
        assert cx == pytest.approx(20, abs=0.6) and cy == pytest.approx(20, abs=0.6)


def test_zero_padding_outside():
    with SlideImage.from_array(np.full((50, 50, 3), 200, np.uint8)) as img:
        c = img.crop(np.array([[0.0, 0.0], [-500.0, -500.0]]), 10, 10)
    assert (c[1] == 0).all()
    assert (c[0, :4, :4] == 0).all() and (c[0, 6:, 6:] == 200).all()


def test_bigtiff_read_by_region_lazily(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (2048, 3072, 3), dtype=np.uint8)
    p = tmp_path / "big.tif"
    tifffile.imwrite(p, big, bigtiff=True, tile=(256, 256), compression="zlib", photometric="rgb")
    with SlideImage.from_file(p) as img:
        assert img.shape == (2048, 3072)
        reg = img.read_region(1000, 700, 1300, 900)
        np.testing.assert_array_equal(reg, big[700:900, 1000:1300])
        reader = img._native(0).reader
        assert reader is not None and len(reader.cache) <= 6  # a few tiles of 96 decoded
        # downsampled level built by streaming, then crops read from it
        thumb, s = img.thumbnail(384)
        assert thumb.shape == (256, 384, 3) and s == pytest.approx(0.125)
        ref = big.reshape(256, 8, 384, 8, 3).mean((1, 3))
        assert np.abs(thumb.astype(float) - ref).mean() < 3


def test_pyramid_tiff_uses_stored_level(tmp_path):
    base = marked_image(8)
    p = tmp_path / "pyr.ome.tif"
    with tifffile.TiffWriter(p, bigtiff=True) as tw:
        tw.write(base, subifds=1, tile=(128, 128), photometric="rgb")
        low = base.reshape(H // 4, 4, W // 4, 4, 3).mean((1, 3)).round().astype(np.uint8)
        tw.write(low, subfiletype=1, tile=(128, 128), photometric="rgb")
    with SlideImage.from_file(p) as img:
        assert len(img._natives) == 2
        crop = img.crop(np.array([[MARK_X, MARK_Y]]), 128, 32)[0]
        assert list(img._native_cache) == [1]
        cx, cy = red_centroid(crop)
        assert cx == pytest.approx(15.5, abs=0.6) and cy == pytest.approx(15.5, abs=0.6)


def test_many_crops_multi_scale(dlpfc_dir):
    a = read_visium(dlpfc_dir)
    with open_image(a) as img:
        assert img.path is None and img.shape == (13332, 13332)
        for um in (110, 330, 990):
            crops = img.crop(a.obsm["spatial"], um / img.microns_per_pixel, 32)
            assert crops.shape == (a.n_obs, 32, 32, 3)
        assert 50 < crops.mean() < 250 and crops.std() > 5
        # tissue is pink/purple: green is the lowest channel
        assert np.median(crops[..., [0, 2]].mean(-1) - crops[..., 1]) > 10


def test_open_image_errors(tmp_path, dlpfc_dir):
    a = read_visium(dlpfc_dir)
    a.uns["tissuegraph"]["image_path"] = str(tmp_path / "gone.tif")
    with pytest.warns(UserWarning, match="not found"):
        open_image(a).close()
    with pytest.raises(InputError, match="does not exist"):
        open_image(a, prefer="file")
    a.uns["tissuegraph"]["image_path"] = None
    del a.uns["spatial"]["151673"]["images"]["lowres"]
    with pytest.raises(InputError, match="no image"):
        open_image(a)
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(InputError, match="bad.tif"):
        SlideImage.from_file(bad)


def test_jpeg_full_resolution_memmap_cache(tmp_path, monkeypatch):
    import tissuegraph.io.image as image_mod

    monkeypatch.setattr(image_mod, "_IN_MEMORY_BYTES", 1000)
    p = tmp_path / "x.jpg"
    Image.fromarray(marked_image(6)).save(p, quality=95)
    img = SlideImage.from_file(p)
    reg = img.read_region(MARK_X - 3, MARK_Y - 3, MARK_X + 4, MARK_Y + 4)
    assert reg[..., 0].min() > 200 and reg[..., 1].max() < 60
    assert isinstance(img._native(0).array, np.memmap)
    tmp = img._tmp
    assert tmp is not None and any(tmp.iterdir())
    resized = img.read_region(0, 0, W, H, out_shape=(60, 80))
    assert resized.shape == (60, 80, 3)
    img.close()
    assert not tmp.exists()


def test_tiff_pixel_size_from_tags(tmp_path):
    a = marked_image(0)
    p = tmp_path / "res.tif"
    tifffile.imwrite(
        p, a, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER"
    )
    with SlideImage.from_file(p) as img:
        assert img.microns_per_pixel == pytest.approx(0.5)
    q = tmp_path / "svs_like.tif"
    tifffile.imwrite(q, a, photometric="rgb", description="Aperio Image|MPP = 0.2520|AppMag = 40")
    with SlideImage.from_file(q) as img:
        assert img.microns_per_pixel == pytest.approx(0.252)
    r = tmp_path / "plain.tif"
    tifffile.imwrite(r, a, photometric="rgb")
    with SlideImage.from_file(r) as img:
        assert img.microns_per_pixel is None
