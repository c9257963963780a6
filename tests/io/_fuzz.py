"""Fuzzing machinery: small real inputs, mutations of files and folders, outcome checks.

Used by ``test_fuzz.py``. A case is a base input (a small subset of a real dataset, built once
per session) copied to a fresh folder, one or two mutations applied to its files, then a
reader (or build-graphs) run on it. The outcome must be a valid AnnData / graph, or a
one-line :class:`~tissuegraph.errors.InputError` / :class:`~tissuegraph.errors.ConfigError`
naming a path of the case; anything else is an escape.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

# ----------------------------------------------------------------------------- base inputs
LOWRES_FACTOR = 4  # lowres images are shrunk 4x (and their scale factor with them)


def _shrink_image(src: Path, dst: Path, factor: int) -> None:
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("RGB")
        small = im.resize((max(1, im.width // factor), max(1, im.height // factor)))
        small.save(dst)


def _copy_scalefactors(src: Path, dst: Path, drop_hires: bool = True) -> None:
    sf = json.loads(src.read_text())
    sf["tissue_lowres_scalef"] = sf["tissue_lowres_scalef"] / LOWRES_FACTOR
    if drop_hires:
        sf.pop("tissue_hires_scalef", None)
    dst.write_text(json.dumps(sf))


def make_visium_toy(data: Path, dst: Path) -> Path:
    """``visium_toy`` (10x HDF5, v1 positions list): lowres shrunk, no hires image."""
    src = data / "visium_toy"
    (dst / "spatial").mkdir(parents=True)
    shutil.copyfile(src / "filtered_feature_bc_matrix.h5", dst / "filtered_feature_bc_matrix.h5")
    shutil.copyfile(
        src / "spatial" / "tissue_positions_list.csv", dst / "spatial" / "tissue_positions_list.csv"
    )
    _copy_scalefactors(
        src / "spatial" / "scalefactors_json.json", dst / "spatial" / "scalefactors_json.json"
    )
    _shrink_image(
        src / "spatial" / "tissue_lowres_image.png",
        dst / "spatial" / "tissue_lowres_image.png",
        LOWRES_FACTOR,
    )
    return dst


def make_visium_sr3(data: Path, dst: Path, n_spots: int = 40, n_genes: int = 200) -> Path:
    """The first ``n_spots`` barcodes of ``visium_sr3_mtx`` (Space Ranger 3.0 matrix-market
    folder, v2 positions with a header) and their ``n_genes`` most detected genes; the
    Matrix Market header (with Space Ranger's metadata line) is kept as written."""
    src = data / "visium_sr3_mtx"
    mdir = src / "filtered_feature_bc_matrix"
    header, entries = [], []
    with gzip.open(mdir / "matrix.mtx.gz", "rt") as fh:
        line = fh.readline()
        while line.startswith("%"):
            header.append(line)
            line = fh.readline()
        for line in fh:
            r, c, v = line.split()
            if int(c) > n_spots:  # entries are sorted by barcode (column)
                break
            entries.append((int(r), int(c), int(v)))
    e = np.array(entries, dtype=np.int64)
    detected = np.bincount(e[:, 0], minlength=int(e[:, 0].max()) + 1)
    genes = np.sort(np.argsort(-detected, kind="stable")[:n_genes])  # 1-based rows, file order
    new_row = {int(g): i + 1 for i, g in enumerate(genes)}
    keep = [(new_row[r], c, v) for r, c, v in entries if r in new_row]
    out = dst / "filtered_feature_bc_matrix"
    out.mkdir(parents=True)
    body = "".join(header) + f"{len(genes)} {n_spots} {len(keep)}\n"
    body += "".join(f"{r} {c} {v}\n" for r, c, v in keep)
    with gzip.open(out / "matrix.mtx.gz", "wt", compresslevel=1) as fh:
        fh.write(body)
    barcodes = gzip.open(mdir / "barcodes.tsv.gz", "rt").read().splitlines()[:n_spots]
    with gzip.open(out / "barcodes.tsv.gz", "wt", compresslevel=1) as fh:
        fh.write("\n".join(barcodes) + "\n")
    feats = gzip.open(mdir / "features.tsv.gz", "rt").read().splitlines()
    with gzip.open(out / "features.tsv.gz", "wt", compresslevel=1) as fh:
        fh.write("\n".join(feats[g - 1] for g in genes) + "\n")
    spatial = dst / "spatial"
    spatial.mkdir()
    lines = (src / "spatial" / "tissue_positions.csv").read_text().splitlines()
    wanted = set(barcodes)
    rows = [ln for ln in lines[1:] if ln.split(",")[0] in wanted]
    others = [ln for ln in lines[1:] if ln.split(",")[0] not in wanted][:150]
    (spatial / "tissue_positions.csv").write_text("\n".join([lines[0], *rows, *others]) + "\n")
    _copy_scalefactors(
        src / "spatial" / "scalefactors_json.json", spatial / "scalefactors_json.json"
    )
    _shrink_image(
        src / "spatial" / "tissue_lowres_image.png",
        spatial / "tissue_lowres_image.png",
        LOWRES_FACTOR,
    )
    return dst


def make_st(data: Path, dst: Path, n_spots: int = 30, n_genes: int = 150) -> Path:
    """her2st C2: ``n_spots`` neighbouring selected spots (and a few unselected ones), their
    ``n_genes`` highest-count genes, and the H&E crop around them shrunk 4x."""
    from PIL import Image

    src = data / "her2st" / "C2"
    counts = pd.read_csv(src / "counts.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(src / "spots.tsv", sep="\t")
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"])]
    sel = spots[(spots["selected"] == 1) & spots.index.isin(counts.index)]
    centre = sel[["x", "y"]].median().to_numpy()
    d = np.linalg.norm(sel[["x", "y"]].to_numpy() - centre, axis=1)
    chosen = sel.index[np.argsort(d, kind="stable")[:n_spots]]
    unsel = spots[spots["selected"] != 1]
    du = np.linalg.norm(unsel[["x", "y"]].to_numpy() - centre, axis=1)
    extra = unsel.index[np.argsort(du, kind="stable")[:8]]
    sub = counts.loc[chosen]
    genes = sub.sum(0).sort_values(ascending=False, kind="stable").index[:n_genes]
    sub = sub[[g for g in counts.columns if g in set(genes)]]
    dst.mkdir(parents=True)
    sub.to_csv(dst / "counts.tsv.gz", sep="\t", compression={"method": "gzip", "compresslevel": 1})
    table = spots.loc[list(chosen) + list(extra)].copy()
    x0 = int(table["pixel_x"].min()) - 300
    y0 = int(table["pixel_y"].min()) - 300
    x1 = int(table["pixel_x"].max()) + 300
    y1 = int(table["pixel_y"].max()) + 300
    old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(src / "he.jpg") as im:
            full_w = im.width
            im.draft("RGB", (im.width // 4, im.height // 4))  # decoded at about 1/4 scale
            s = full_w / im.width
            box = (int(x0 / s), int(y0 / s), int(x1 / s), int(y1 / s))
            im.crop(box).save(dst / "he.jpg", quality=85)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    table["pixel_x"] = (table["pixel_x"] / s - box[0]).round(2)
    table["pixel_y"] = (table["pixel_y"] / s - box[1]).round(2)
    table.to_csv(dst / "spots.tsv", sep="\t", index=False)
    return dst


def make_h5ad(toy_base: Path, dst: Path) -> Path:
    from tissuegraph.io import read_visium, write_h5ad

    dst.mkdir(parents=True)
    write_h5ad(read_visium(toy_base), dst / "slide.h5ad", compression=None)
    return dst


#: Per base: the files and folders a mutation may target ("" is the case folder itself).
TARGETS = {
    "visium_toy": [
        "filtered_feature_bc_matrix.h5",
        "spatial/tissue_positions_list.csv",
        "spatial/scalefactors_json.json",
        "spatial/tissue_lowres_image.png",
        "spatial",
        "",
    ],
    "visium_sr3_mtx": [
        "filtered_feature_bc_matrix/matrix.mtx.gz",
        "filtered_feature_bc_matrix/barcodes.tsv.gz",
        "filtered_feature_bc_matrix/features.tsv.gz",
        "spatial/tissue_positions.csv",
        "spatial/scalefactors_json.json",
        "spatial/tissue_lowres_image.png",
        "filtered_feature_bc_matrix",
        "spatial",
    ],
    "her2st": ["counts.tsv.gz", "spots.tsv", "he.jpg", ""],
    "h5ad": ["slide.h5ad"],
}

# ----------------------------------------------------------------------------- mutations
CELL_VALUES = [
    "", "nan", "NaN", "-1", "-0.5", "2.5", "inf", "-inf", "abc", "1e40", "1e-300",
    "9" * 25, "0x1F", " ", "TRUE", "None", "\u0663", "1,5", "-0", "3.0",
]  # fmt: skip
JSON_VALUES = [0, -1, "abc", None, 1e308, [], {}, True, float("nan"), float("inf"), 1e-9]
NUMERIC_BAD = [np.nan, -1.0, 0.5, np.inf, -np.inf, 1e39, 2.0**40]

BYTE_OPS = ["truncate", "bitflip", "empty", "delete", "garbage", "to_folder"]
TEXT_OPS = [
    "drop_column",
    "rename_column",
    "shuffle_rows",
    "set_cell",
    "set_cell",
    "drop_rows",
    "dup_row",
    "ragged_row",
    "wrong_dtype",
]
OPS_BY_KIND = {
    "table": BYTE_OPS + TEXT_OPS,
    "json": BYTE_OPS + ["json_value", "json_value", "json_value"],
    "hdf5": BYTE_OPS + ["h5_value", "h5_value", "h5_value", "h5_dtype", "h5_drop", "h5_resize"],
    "image": BYTE_OPS + ["image_size", "image_size", "image_mode"],
    "folder": ["delete", "delete", "to_file", "empty_folder"],
}


def kind_of(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    if rel == "" or "." not in name:
        return "folder"
    if name.endswith((".csv", ".tsv", ".tsv.gz", ".mtx.gz", ".csv.gz")):
        return "table"
    if name.endswith(".json"):
        return "json"
    if name.endswith((".h5", ".h5ad")):
        return "hdf5"
    return "image"


def ops_for(rel: str) -> list[str]:
    return OPS_BY_KIND[kind_of(rel)]


class _NotApplicable(Exception):
    """The file is no longer of its kind (an earlier mutation broke it): fall back."""


def _read_text(p: Path) -> str:
    raw = p.read_bytes()
    try:
        if p.name.endswith(".gz"):
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except Exception as exc:
        raise _NotApplicable from exc


def _write_text(p: Path, text: str) -> None:
    data = text.encode("utf-8", errors="surrogateescape")
    if p.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=1)
    p.write_bytes(data)


def _sep(p: Path) -> str:
    name = p.name.replace(".gz", "")
    return {".csv": ",", ".tsv": "\t", ".mtx": " "}[Path(name).suffix]


def _n_header(lines: list[str]) -> int:
    """Leading lines that are not data rows: Matrix Market comments + size line, or 1."""
    k = 0
    while k < len(lines) and lines[k].startswith("%"):
        k += 1
    return k + 1


def _text_op(op: str, p: Path, rng: random.Random) -> None:
    text = _read_text(p)
    sep = _sep(p)
    lines = text.split("\n")
    trailing = lines and lines[-1] == ""
    if trailing:
        lines = lines[:-1]
    if not lines:
        raise _NotApplicable
    rows = [ln.split(sep) for ln in lines]
    width = max(len(r) for r in rows)
    h = min(_n_header(lines), len(rows))
    j = rng.randrange(width)
    if op == "drop_column":
        rows = [r[:j] + r[j + 1 :] if len(r) > j else r for r in rows]
    elif op == "rename_column":
        i = h - 1
        if len(rows[i]) > j:
            rows[i][j] = rng.choice(["renamed", "", "barcode", rows[i][-1], "x", "pixel_x"])
    elif op == "shuffle_rows":
        body = rows[h:]
        rng.shuffle(body)
        rows = rows[:h] + body
    elif op == "set_cell":
        i = rng.randrange(len(rows))
        r = rows[i]
        r[min(j, len(r) - 1)] = rng.choice(CELL_VALUES)
    elif op == "drop_rows":
        if len(rows) > h:
            keep = rng.random()
            rows = rows[:h] + [r for r in rows[h:] if rng.random() < keep]
    elif op == "dup_row":
        i = rng.randrange(len(rows))
        rows.insert(rng.randrange(len(rows) + 1), list(rows[i]))
    elif op == "ragged_row":
        i = rng.randrange(len(rows))
        rows[i] = rows[i][:-1] if rng.random() < 0.5 else rows[i] + ["1"]
    elif op == "wrong_dtype":
        value = rng.choice(["abc", "1.5", "", "True", "-2", "1e400"])
        rows = rows[:h] + [r[:j] + [value] + r[j + 1 :] if len(r) > j else r for r in rows[h:]]
    out = "\n".join(sep.join(r) for r in rows) + ("\n" if trailing else "")
    _write_text(p, out)


def _json_op(p: Path, rng: random.Random) -> None:
    try:
        doc = json.loads(_read_text(p))
    except ValueError as exc:
        raise _NotApplicable from exc
    if not isinstance(doc, dict) or not doc or rng.random() < 0.1:
        doc = rng.choice([[1, 2], 3.5, "text", None, {}])
    else:
        key = rng.choice(sorted(doc))
        r = rng.random()
        if r < 0.25:
            del doc[key]
        elif r < 0.3:
            doc["unexpected"] = rng.choice(JSON_VALUES)
        else:
            doc[key] = rng.choice(JSON_VALUES)
    p.write_text(json.dumps(doc))


def _h5_op(op: str, p: Path, rng: random.Random) -> None:
    import h5py

    try:
        with h5py.File(p, "r+") as f:
            names: list[str] = []
            f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
            if not names:
                raise _NotApplicable
            # most of the time hit the matrix itself, else any dataset
            core = [n for n in names if n.rsplit("/", 1)[-1] in ("data", "indices", "indptr")]
            name = rng.choice(core if core and rng.random() < 0.6 else names)
            arr = f[name][()]
            attrs = dict(f[name].attrs)
            if op == "h5_drop":
                del f[name]
                return
            arr = np.asarray(arr)
            if op == "h5_value":
                if arr.size == 0:
                    raise _NotApplicable
                if arr.dtype.kind in "iuf":
                    arr = arr.astype(np.float64) if arr.dtype.kind == "f" else arr.astype(np.int64)
                    v = rng.choice(NUMERIC_BAD)
                    if arr.dtype.kind == "i":
                        v = rng.choice([-1, 2**31 - 1, int(arr.max()) + 7, 0])
                    arr.flat[rng.randrange(arr.size)] = v
                else:
                    arr = arr.copy()
                    arr.flat[rng.randrange(arr.size)] = rng.choice([b"", b"X" * 40, b"\xff\xfe"])
            elif op == "h5_dtype":
                target = rng.choice(["S", "f8", "f2", "bool", "i1"])
                try:
                    arr = arr.astype(target)
                except (ValueError, TypeError, OverflowError):
                    arr = arr.astype("S")
            elif op == "h5_resize":
                if arr.ndim == 0:
                    raise _NotApplicable
                arr = arr[: len(arr) // 2] if rng.random() < 0.5 else np.concatenate([arr, arr[:3]])
            del f[name]
            f.create_dataset(name, data=arr)
            for k, v in attrs.items():
                f[name].attrs[k] = v
    except _NotApplicable:
        raise
    except Exception as exc:  # an earlier mutation damaged the file
        raise _NotApplicable from exc


def _image_op(op: str, p: Path, rng: random.Random) -> None:
    from PIL import Image

    try:
        with Image.open(p) as im:
            im.load()
            fmt = im.format or ("JPEG" if p.suffix == ".jpg" else "PNG")
            if op == "image_size":
                w = max(1, int(im.width * rng.choice([0.01, 0.1, 0.5, 0.9, 1.1, 2.0])))
                h = max(1, int(im.height * rng.choice([0.01, 0.1, 0.5, 0.9, 1.1, 2.0])))
                out = im.resize((w, h))
            else:
                modes = ["L", "RGBA", "1", "P", "LA"] if fmt == "PNG" else ["L", "CMYK", "1"]
                out = im.convert(rng.choice(modes))
                if fmt == "JPEG" and out.mode == "1":
                    out = out.convert("L")
            out.save(p, format=fmt)
    except Exception as exc:
        raise _NotApplicable from exc


def _byte_op(op: str, p: Path, rng: random.Random) -> None:
    if op == "delete":
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        return
    if op == "to_folder":
        if p.is_file():
            p.unlink()
            p.mkdir()
        return
    if not p.is_file():
        return
    raw = bytearray(p.read_bytes())
    if op == "empty":
        raw = bytearray()
    elif op == "truncate":
        raw = raw[: int(len(raw) * rng.random())]
    elif op == "garbage":
        raw = bytearray(rng.getrandbits(8) for _ in range(rng.choice([1, 17, 512, 4096])))
    else:  # bitflip
        for _ in range(rng.choice([1, 2, 8, 64])):
            if raw:
                i = rng.randrange(len(raw))
                raw[i] ^= 1 << rng.randrange(8)
    p.write_bytes(bytes(raw))


def _folder_op(op: str, p: Path, rng: random.Random) -> None:
    if not p.exists():
        return
    if op == "delete":
        _byte_op("delete", p, rng)
    elif op == "to_file":
        if p.is_dir():
            shutil.rmtree(p)
            p.write_bytes(b"")
    elif op == "empty_folder" and p.is_dir():
        for q in p.iterdir():
            shutil.rmtree(q) if q.is_dir() else q.unlink()


def apply_mutation(root: Path, rel: str, op: str, seed: int) -> str:
    """Apply ``op`` to ``root/rel``; returns the operation actually applied (a byte-level
    bit flip when ``op`` no longer fits the file)."""
    rng = random.Random(seed)
    p = root / rel if rel else root
    kind = kind_of(rel)
    if kind == "folder":
        _folder_op(op, p, rng)
        return op
    if op in BYTE_OPS or not p.is_file():
        _byte_op(op, p, rng)
        return op
    try:
        if op in TEXT_OPS:
            _text_op(op, p, rng)
        elif op == "json_value":
            _json_op(p, rng)
        elif op.startswith("h5_"):
            _h5_op(op, p, rng)
        elif op.startswith("image_"):
            _image_op(op, p, rng)
        return op
    except _NotApplicable:
        _byte_op("bitflip", p, rng)
        return "bitflip"


# ----------------------------------------------------------------------------- outcomes
@dataclass
class FuzzStats:
    """What the fuzz tests saw: cases per suite, outcomes (``valid`` or an exception type),
    escapes (anything but a one-line InputError / ConfigError naming the case's files) and
    partial outputs (files left by a failed build-graphs)."""

    cases: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    ops: Counter = field(default_factory=Counter)
    escapes: list = field(default_factory=list)
    partial_outputs: int = 0
    seconds: float = 0.0
    suite_seconds: Counter = field(default_factory=Counter)
    suite_outcomes: Counter = field(default_factory=Counter)

    def record(self, suite: str, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self.suite_outcomes[f"{suite}: {outcome}"] += 1

    def as_dict(self) -> dict:
        return {
            "cases": sum(self.cases.values()),
            "cases_by_suite": dict(self.cases),
            "outcomes": dict(self.outcomes.most_common()),
            "outcomes_by_suite": dict(sorted(self.suite_outcomes.items())),
            "exception_types": sorted(
                {k.split(": ")[-1] for k in self.outcomes if not k.endswith("valid")}
            ),
            "mutations": dict(self.ops.most_common()),
            "escapes": len(self.escapes),
            "escape_examples": self.escapes[:10],
            "partial_outputs": self.partial_outputs,
            "seconds": round(self.seconds, 1),
            "seconds_by_suite": {k: round(v, 1) for k, v in self.suite_seconds.items()},
        }


def check_adata(adata, expression: str = "raw", require_spatial: bool = True) -> None:
    """A reader's result is usable: finite, non-negative (integer) values, coordinates and
    scale, unique names, consistent shapes. An h5ad may lack coordinates and scale (it need
    not be a slide), but what it has must be finite."""
    import scipy.sparse as sp
    from anndata import AnnData

    assert isinstance(adata, AnnData), type(adata)
    assert adata.n_obs > 0 and adata.n_vars > 0, f"shape {adata.shape}"
    assert adata.obs_names.is_unique and adata.var_names.is_unique, "names not unique"
    X = adata.X
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    assert np.isfinite(data).all() and (data >= 0).all(), "NaN, infinite or negative in X"
    if expression == "raw":
        assert (data == np.round(data)).all(), "non-integer counts in X"
    for key in ("spatial", "spatial_um"):
        if key not in adata.obsm and not require_spatial:
            continue
        xy = np.asarray(adata.obsm[key])
        assert xy.shape == (adata.n_obs, 2) and np.isfinite(xy).all(), f"bad obsm[{key!r}]"
    if require_spatial:
        mpp = float(adata.uns["tissuegraph"]["microns_per_pixel"])
        assert np.isfinite(mpp) and mpp > 0, f"microns_per_pixel {mpp}"
    if "in_tissue" in adata.obs:
        assert set(np.unique(adata.obs["in_tissue"])) <= {0, 1}, "in_tissue not 0 or 1"


def check_graph(path: Path) -> None:
    import torch

    from tissuegraph.graph import schema as S
    from tissuegraph.graph.storage import load_graph

    g = load_graph(path)
    n = g[S.SPOT].num_nodes
    assert n > 0, "no spots"
    assert torch.isfinite(g[S.SPOT].x.float()).all(), "NaN or infinite spot.x"
    assert torch.isfinite(g[S.SPOT].pos).all(), "NaN or infinite spot.pos"
    ei = g[S.SPOT_NEAR_SPOT].edge_index
    assert ei.numel() == 0 or (int(ei.min()) >= 0 and int(ei.max()) < n), "bad spot edges"
