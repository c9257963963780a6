"""Legacy ST reader on her2st C2 and on corrupted copies."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from tissuegraph.errors import InputError
from tissuegraph.io import open_image, read_st


@pytest.fixture(scope="session")
def c2_dir(her2st_dir):
    return her2st_dir / "C2"


@pytest.fixture(scope="session")
def c2(c2_dir):
    return read_st(c2_dir / "counts.tsv.gz", c2_dir / "spots.tsv", c2_dir / "he.jpg")


def test_layout(c2, c2_dir):
    spots = pd.read_csv(c2_dir / "spots.tsv", sep="\t")
    n_sel = int((spots["selected"] == 1).sum())
    assert c2.n_obs == n_sel == 187
    assert c2.n_vars > 15000 and c2.var_names.is_unique
    assert c2.X.dtype == np.float32
    tg = c2.uns["tissuegraph"]
    assert tg["platform"] == "st" and tg["grid"] == "square" and tg["library_id"] == "C2"
    assert tg["image_path"].endswith("he.jpg")
    # array_col = x, array_row = y, and the id XxY
    assert all(f"{x}x{y}" == i for x, y, i in zip(c2.obs.array_col, c2.obs.array_row, c2.obs_names))
    row = spots.set_index(spots["x"].astype(str) + "x" + spots["y"].astype(str)).loc[
        c2.obs_names[0]
    ]
    np.testing.assert_allclose(c2.obsm["spatial"][0], [row["pixel_x"], row["pixel_y"]])
    imgs = c2.uns["spatial"]["C2"]["images"]
    assert max(imgs["hires"].shape[:2]) == 2000 and max(imgs["lowres"].shape[:2]) == 600


def test_micron_spacing(c2):
    """Array neighbours (x + 1, same y) are 200 um apart; ~256-290 px in he.jpg."""
    x = c2.obs["array_col"].to_numpy()
    y = c2.obs["array_row"].to_numpy()
    key = {(a, b): i for i, (a, b) in enumerate(zip(x, y))}
    pairs = [(i, key[(a + 1, b)]) for i, (a, b) in enumerate(zip(x, y)) if (a + 1, b) in key]
    assert len(pairs) > 100
    i, j = np.array(pairs).T
    d = np.linalg.norm(c2.obsm["spatial_um"][i] - c2.obsm["spatial_um"][j], axis=1)
    assert np.median(d) == pytest.approx(200.0, rel=0.05)
    assert 0.5 < c2.uns["tissuegraph"]["microns_per_pixel"] < 1.0


def test_crop_at_spot_is_tissue(c2):
    """H&E tissue is pink/purple (green lowest); the slide corner is grey background."""
    with open_image(c2) as img:
        assert img.shape == (9911, 9274)
        size = 100.0 / img.microns_per_pixel
        crops = img.crop(c2.obsm["spatial"], size, 24).astype(float)
        corner = img.crop(np.array([[60.0, 60.0]]), size, 24).astype(float)
        assert 0 not in img._native_cache  # never decoded at full resolution
    tint = crops[..., [0, 2]].mean(-1) - crops[..., 1]
    assert np.median(tint.mean(axis=(1, 2))) > 10
    assert abs(corner[..., [0, 2]].mean(-1) - corner[..., 1]).mean() < 5


def test_full_resolution_region_matches_pil(c2, c2_dir):
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    x, y = (int(v) for v in c2.obsm["spatial"][10])
    with Image.open(c2_dir / "he.jpg") as im:
        ref = np.asarray(im.crop((x - 8, y - 8, x + 9, y + 9)).convert("RGB"))
    with open_image(c2) as img:
        got = img.crop(np.array([[x, y]]), 17, 17)[0]
    np.testing.assert_array_equal(got, ref)


# ----------------------------------------------------------------------------- bad input
@pytest.fixture()
def c2_copy(tmp_path, c2_dir):
    for n in ("counts.tsv.gz", "spots.tsv", "he.jpg"):
        shutil.copy(c2_dir / n, tmp_path / n)
        (tmp_path / n).chmod(0o644)
    return tmp_path


def test_missing_file(c2_copy):
    with pytest.raises(InputError, match="not found"):
        read_st(c2_copy / "nope.tsv.gz", c2_copy / "spots.tsv", c2_copy / "he.jpg")


def test_spot_table_missing_columns(c2_copy):
    (c2_copy / "spots.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(InputError, match="pixel_x"):
        read_st(c2_copy / "counts.tsv.gz", c2_copy / "spots.tsv", c2_copy / "he.jpg")


def test_ids_do_not_match(c2_copy):
    s = pd.read_csv(c2_copy / "spots.tsv", sep="\t")
    s["x"] += 100
    s.to_csv(c2_copy / "spots.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="none of the"):
        read_st(c2_copy / "counts.tsv.gz", c2_copy / "spots.tsv", c2_copy / "he.jpg")


def test_coordinates_outside_image(c2_copy):
    s = pd.read_csv(c2_copy / "spots.tsv", sep="\t")
    s.loc[0, "pixel_x"] = 50_000
    s.to_csv(c2_copy / "spots.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="outside the image"):
        read_st(c2_copy / "counts.tsv.gz", c2_copy / "spots.tsv", c2_copy / "he.jpg")


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_jpeg(c2_copy, kind):
    p = c2_copy / "he.jpg"
    raw = p.read_bytes()
    p.write_bytes(b"\x00garbage" * 1000 if kind == "garbage" else raw[: len(raw) // 3])
    with pytest.raises(InputError, match="he.jpg") as e:
        read_st(c2_copy / "counts.tsv.gz", c2_copy / "spots.tsv", p)
    assert "\n" not in str(e.value)


def test_zero_genes(c2_copy):
    (c2_copy / "counts.tsv").write_text("\n10x21\n10x22\n")
    with pytest.raises(InputError, match="counts"):
        read_st(c2_copy / "counts.tsv", c2_copy / "spots.tsv", c2_copy / "he.jpg")


def test_corrupt_counts(c2_copy):
    raw = (c2_copy / "counts.tsv.gz").read_bytes()
    (c2_copy / "counts.tsv.gz").write_bytes(raw[:1000])
    with pytest.raises(InputError, match="counts.tsv.gz"):
        read_st(c2_copy / "counts.tsv.gz", c2_copy / "spots.tsv", c2_copy / "he.jpg")


def test_without_image(c2_dir):
    a = read_st(c2_dir / "counts.tsv.gz", c2_dir / "spots.tsv", None, library_id="lib")
    assert a.uns["tissuegraph"]["image_path"] is None
    assert a.uns["spatial"]["lib"]["images"] == {}
    with pytest.raises(InputError, match="no image"):
        open_image(a)


@pytest.mark.parametrize(
    ("value", "kind"), [("", "NaN"), ("nan", "NaN"), ("-1", "negative"), ("2.5", "non-integer")]
)
def _edit_counts(folder, row: int, col: int, value: str):
    """Set one cell of the counts table (text level, so nothing else changes); returns the
    plain-text table's path and the spot id and gene of that cell."""
    import gzip

    lines = gzip.open(folder / "counts.tsv.gz", "rt").read().splitlines()
    header = lines[0].split("\t")
    fields = lines[row + 1].split("\t")
    fields[col + 1] = value
    lines[row + 1] = "\t".join(fields)
    out = folder / "counts.tsv"
    out.write_text("\n".join(lines) + "\n")
    return out, fields[0], header[col + 1]


@pytest.mark.parametrize(
    ("value", "kind"), [("", "NaN"), ("nan", "NaN"), ("-1", "negative"), ("2.5", "non-integer")]
)
def test_bad_count_values(c2_copy, value, kind):
    """One bad cell of the counts table is refused, naming the file, spot, gene and count."""
    counts, spot, gene = _edit_counts(c2_copy, 4, 10, value)
    with pytest.raises(InputError) as e:
        read_st(counts, c2_copy / "spots.tsv", None)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(counts))
    assert f"1 invalid value(s) in the counts (1 {kind})" in msg
    assert f"spot {spot!r}, gene {gene!r}" in msg


def test_duplicate_spot_ids(c2_copy):
    import gzip

    lines = gzip.open(c2_copy / "counts.tsv.gz", "rt").read().splitlines()
    (c2_copy / "counts.tsv").write_text("\n".join(lines + lines[1:2]) + "\n")
    with pytest.raises(InputError, match="occurs more than once"):
        read_st(c2_copy / "counts.tsv", c2_copy / "spots.tsv", None)


def test_infinite_pixel_coordinates(c2_copy):
    s = pd.read_csv(c2_copy / "spots.tsv", sep="\t")
    s.loc[3, "pixel_y"] = np.inf
    s.to_csv(c2_copy / "spots.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="infinite"):
        read_st(c2_copy / "counts.tsv.gz", c2_copy / "spots.tsv", None)
