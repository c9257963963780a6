"""Graph building on the real data: DLPFC 151673 (Visium), HER2+ ST, priors, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.spatial import cKDTree

from tissuegraph import io
from tissuegraph.graph import schema as S
from tissuegraph.graph.config import BuildConfig
from tissuegraph.graph.pipeline import build_slide_graph, select_panel
from tissuegraph.graph.spatial import spot_graph
from tissuegraph.graph.storage import load_graph

N_TOP = 300


@pytest.fixture(scope="session")
def dlpfc_adata(dlpfc_dir):
    return io.read_visium(dlpfc_dir)


def _cfg(priors_dir, **patches) -> BuildConfig:
    cfg = BuildConfig()
    cfg.panel.n_top = N_TOP
    cfg.priors.tf_targets = str(priors_dir / "collectri_human.csv")
    cfg.priors.pathways = str(priors_dir / "progeny_human_top100.tsv")
    cfg.priors.ligand_receptor = str(priors_dir / "liana_consensus_human.tsv")
    for k, v in patches.items():
        setattr(cfg.patches, k, v)
    return cfg


@pytest.fixture(scope="session")
def dlpfc_graph(dlpfc_adata, priors_dir):
    cfg = _cfg(priors_dir)
    genes = select_panel({"151673": dlpfc_adata}, cfg)
    data = build_slide_graph(dlpfc_adata, cfg, genes=genes, slide_name="151673")
    return data


def _interior_degree_check(pos_um, ei, radius_um):
    """Degree equals the number of spots within ``radius_um`` (independent KD-tree count)."""
    deg = np.bincount(ei[0], minlength=len(pos_um))
    tree = cKDTree(pos_um)
    within = np.array([len(n) - 1 for n in tree.query_ball_point(pos_um, radius_um)])
    return deg, within


def test_dlpfc_spot_graph_is_hex_lattice(dlpfc_adata, dlpfc_graph):
    ei = dlpfc_graph[S.SPOT_NEAR_SPOT].edge_index.numpy()
    pos = dlpfc_graph[S.SPOT].pos.numpy().astype(np.float64)
    n = dlpfc_adata.n_obs
    assert dlpfc_graph[S.SPOT].num_nodes == n
    assert not np.any(ei[0] == ei[1])
    pairs = set(zip(ei[0].tolist(), ei[1].tolist()))
    assert pairs == set(zip(ei[1].tolist(), ei[0].tolist()))
    deg, within = _interior_degree_check(pos, ei, 110.0)
    assert deg.max() == 6 and np.mean(deg == 6) > 0.85
    assert np.mean(deg == within) > 0.99
    d = dlpfc_graph[S.SPOT_NEAR_SPOT].edge_attr.numpy().ravel()
    assert np.median(d) == pytest.approx(100.0, rel=0.03)  # Visium: 100 µm centre to centre
    assert d.max() / d.min() < 1.05
    rc = np.stack([dlpfc_adata.obs["array_row"], dlpfc_adata.obs["array_col"]], 1)
    ei2, d2 = spot_graph(pos, method="grid", array_rc=rc, grid="hex", rings=2)
    deg2, within2 = _interior_degree_check(pos, ei2, 220.0)
    assert deg2.max() == 18 and np.median(deg2) == 18
    assert np.mean(deg2 == within2) > 0.99
    assert d2.max() == pytest.approx(200.0, rel=0.03)


def test_dlpfc_patch_hierarchy(dlpfc_graph):
    g = dlpfc_graph
    assert S.patch_types(g) == ["patch_0", "patch_1", "patch_2"]
    assert torch.equal(g["patch_0"].pos, g[S.SPOT].pos)
    of = g[S.PATCH0_OF_SPOT].edge_index
    assert torch.equal(of[0], of[1]) and of.shape[1] == g[S.SPOT].num_nodes
    for k in range(2):
        e = g[S.patch_in_parent(k)]
        child = g[S.patch(k)].pos[e.edge_index[0]].double()
        parent = g[S.patch(k + 1)].pos[e.edge_index[1]].double()
        s = float(g[S.patch(k + 1)].size_um)
        assert s == pytest.approx(3 * float(g[S.patch(k)].size_um))
        cell = torch.floor((child - (parent - s / 2)) / (s / 3)).long()
        assert cell.min() >= 0 and cell.max() <= 2  # child centre inside the parent
        assert torch.equal(3 * cell[:, 1] + cell[:, 0], e.loc)
        assert torch.bincount(e.edge_index[0]).max() == 1  # exactly one parent
        assert e.edge_index[0].unique().numel() == g[S.patch(k)].num_nodes
        assert g[S.patch(k + 1)].num_nodes == e.edge_index[1].unique().numel()  # no empty cell
        rev = g[S.parent_rev_in_patch(k)]
        assert torch.equal(rev.edge_index, e.edge_index.flip(0))
        assert torch.equal(rev.loc, e.loc)


def test_dlpfc_crops_centred_on_spots(dlpfc_adata, dlpfc_graph):
    """patch_0 crops agree with a direct slice of the lowres PNG around each spot."""
    img = np.asarray(
        Image.open(
            Path(dlpfc_adata.uns["tissuegraph"]["source"]) / "spatial" / "tissue_lowres_image.png"
        ).convert("RGB")
    )
    lib = dlpfc_adata.uns["tissuegraph"]["library_id"]
    s = dlpfc_adata.uns["spatial"][lib]["scalefactors"]["tissue_lowres_scalef"]
    mpp = dlpfc_adata.uns["tissuegraph"]["microns_per_pixel"]
    crops = dlpfc_graph["patch_0"].img.numpy()
    assert crops.dtype == np.uint8 and crops.shape[1:] == (3, 32, 32)
    half = 110.0 / mpp * s / 2  # half side in lowres px
    xy = dlpfc_adata.obsm["spatial"] * s
    rng = np.random.default_rng(0)
    idx = rng.choice(len(xy), 150, replace=False)

    def direct(x, y):
        x0, y0 = int(round(x - half)), int(round(y - half))
        x1, y1 = int(round(x + half)), int(round(y + half))
        sub = img[y0:y1, x0:x1]
        return np.asarray(Image.fromarray(sub).resize((32, 32), Image.BILINEAR), np.float64)

    own, shifted = [], []
    for i in idx:
        c = crops[i].transpose(1, 2, 0).astype(np.float64)
        ref = direct(*xy[i])
        other = direct(xy[i][0] + 2 * half, xy[i][1])  # one patch to the right
        own.append(np.abs(c - ref).mean())
        shifted.append(np.abs(c - other).mean())
    own, shifted = np.array(own), np.array(shifted)
    assert np.median(own) < 8.0  # grey levels
    assert np.median(own) < 0.6 * np.median(shifted)


def test_dlpfc_gene_edges_come_from_priors(dlpfc_graph, priors_dir):
    g = dlpfc_graph
    genes = [x.upper() for x in g.meta["genes"]]
    panel = set(genes)
    tf = pd.read_csv(priors_dir / "collectri_human.csv")
    sign = {}
    for a, b, w in zip(tf["source"].str.upper(), tf["target"].str.upper(), tf["weight"]):
        sign.setdefault((a, b), np.sign(w))
    reg = g[S.GENE_REGULATES_GENE]
    got = {
        (genes[a], genes[b]): float(w)
        for (a, b), w in zip(reg.edge_index.T.tolist(), reg.edge_weight.tolist())
    }
    assert len(got) == reg.edge_index.shape[1] > 0
    for pair, w in got.items():
        assert pair in sign and sign[pair] == w
    expected = {p for p in sign if p[0] in panel and p[1] in panel and p[0] != p[1]}
    assert set(got) == expected  # complete, not only a subset

    lr = pd.read_csv(priors_dir / "liana_consensus_human.tsv", sep="\t")
    allowed = set()
    for lig, rec in zip(lr["ligand"].str.upper(), lr["receptor"].str.upper()):
        for a in lig.split("_"):
            for b in rec.split("_"):
                allowed.add((a, b))
    binds = g[S.GENE_BINDS_GENE].edge_index.T.tolist()
    assert binds and all((genes[a], genes[b]) in allowed for a, b in binds)

    pw = pd.read_csv(priors_dir / "progeny_human_top100.tsv", sep="\t")
    weight = {(p, t.upper()): w for p, t, w in zip(pw["source"], pw["target"], pw["weight"])}
    mem = g[S.GENE_MEMBER_OF_PATHWAY]
    paths = g.meta["pathways"]
    assert g[S.PATHWAY].num_nodes == len(paths) > 0
    for (gi, pi), w in zip(mem.edge_index.T.tolist(), mem.edge_weight.tolist()):
        assert weight[(paths[pi], genes[gi])] == pytest.approx(w, rel=1e-5)
    assert torch.bincount(mem.edge_index[1]).min() >= 3  # min_pathway_genes
    cov = g.meta["prior_coverage"]
    assert cov["tf_targets"]["edges_kept"] == len(expected)
    assert 0 < cov["pathways"]["panel_fraction"] <= 1

    ex = g[S.SPOT_EXPRESSES_GENE]
    assert torch.bincount(ex.edge_index[0]).max() <= 32
    x = g[S.SPOT].x.float()
    np.testing.assert_allclose(
        ex.edge_weight.numpy(), x[ex.edge_index[0], ex.edge_index[1]].numpy(), rtol=2e-3
    )
    # every kept value is >= every dropped nonzero value of the same spot (spot 0)
    row = x[0]
    kept = ex.edge_index[1][ex.edge_index[0] == 0]
    mask = torch.ones_like(row, dtype=torch.bool)
    mask[kept] = False
    assert row[kept].min() >= row[mask].max() - 1e-2


def test_her2st_full_res_patches(her2st_dir, priors_dir):
    sec = her2st_dir / "B4"
    a = io.read_st(sec / "counts.tsv.gz", sec / "spots.tsv", sec / "he.jpg")
    cfg = _cfg(priors_dir, sizes_um=[200.0, 600.0, 1800.0])
    cfg.priors.tf_targets = None
    cfg.priors.ligand_receptor = None
    genes = select_panel({"B4": a}, cfg)
    g = build_slide_graph(a, cfg, genes=genes, slide_name="B4")
    assert g.meta["platform"] == "st" and g.meta["image"].endswith("he.jpg")
    assert g.meta["patch_sizes_um"] == [200.0, 600.0, 1800.0]
    deg = torch.bincount(g[S.SPOT_NEAR_SPOT].edge_index[0], minlength=a.n_obs)
    assert deg.max() == 4 and torch.median(deg.float()) == 4  # square ST lattice
    # crops come from the full-resolution JPEG around the spot pixel
    he = Image.open(sec / "he.jpg")
    mpp = a.uns["tissuegraph"]["microns_per_pixel"]
    half = 200.0 / mpp / 2
    crops = g["patch_0"].img.numpy()
    errs = []
    for i in np.random.default_rng(0).choice(a.n_obs, 25, replace=False):
        x, y = a.obsm["spatial"][i]
        ref = he.crop((round(x - half), round(y - half), round(x + half), round(y + half)))
        ref = np.asarray(ref.convert("RGB").resize((32, 32), Image.BOX), np.float64)
        errs.append(np.abs(crops[i].transpose(1, 2, 0) - ref).mean())
    assert np.median(errs) < 8.0
    assert S.GENE_MEMBER_OF_PATHWAY in g.edge_types and S.GENE_REGULATES_GENE not in g.edge_types


def _write_cfg(path: Path, dlpfc_dir: Path, priors_dir: Path, out: Path, bad: bool) -> Path:
    slides = [{"name": "151673", "format": "visium", "path": str(dlpfc_dir)}]
    if bad:
        slides.append({"name": "broken", "format": "visium", "path": str(out / "nowhere")})
    cfg = {
        "out_dir": str(out),
        "slides": slides,
        "panel": {"mode": "hvg", "n_top": N_TOP, "fit_slides": ["151673"]},
        "patches": {"sizes_um": [110, 330, 990], "crop_px": 16},
        "priors": {"tf_targets": str(priors_dir / "collectri_human.csv")},
    }
    import yaml  # omegaconf dependency

    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_end_to_end(tmp_path, dlpfc_dir, priors_dir, capsys):
    from tissuegraph.cli import main

    out = tmp_path / "graphs"
    cfg = _write_cfg(tmp_path / "build.yaml", dlpfc_dir, priors_dir, out, bad=False)
    assert main(["build-graphs", "-c", str(cfg), "--quiet"]) == 0
    f = out / "151673.pt"
    m = json.loads((out / "manifest.json").read_text())
    for key in (
        "schema_version",
        "tissuegraph_version",
        "versions",
        "config_hash",
        "build_config",
        "genes",
        "gene_ids",
        "pathways",
        "slides",
    ):
        assert key in m
    assert len(m["genes"]) == N_TOP and m["gene_ids"][0].startswith("ENSG")
    (entry,) = m["slides"]
    assert entry["name"] == "151673" and entry["file"] == "151673.pt" and entry["n_spots"] == 3639
    assert entry["edge_counts"]["spot__near__spot"] > 0 and "tf_targets" in entry["prior_coverage"]
    assert (out / "config.yaml").is_file()
    data = torch.load(f, weights_only=True)  # loads with the PyG classes allow-listed
    assert data.meta["genes"] == m["genes"] and data["patch_0"].img.shape[-1] == 16

    mtime = f.stat().st_mtime_ns
    assert main(["build-graphs", "-c", str(cfg), "--quiet"]) == 0
    assert f.stat().st_mtime_ns == mtime  # up to date: skipped
    m2 = json.loads((out / "manifest.json").read_text())
    assert m2["gene_ids"] == m["gene_ids"] and m2["slides"] == m["slides"]
    assert main(["build-graphs", "-c", str(cfg), "--quiet", "--force"]) == 0
    assert f.stat().st_mtime_ns != mtime  # rebuilt
    mtime = f.stat().st_mtime_ns
    assert main(["build-graphs", "-c", str(cfg), "--quiet", "priors.expresses_top_k=8"]) == 0
    assert f.stat().st_mtime_ns != mtime  # a changed option rebuilds
    assert torch.bincount(load_graph(f)[S.SPOT_EXPRESSES_GENE].edge_index[0]).max() <= 8

    capsys.readouterr()
    cfg_bad = _write_cfg(tmp_path / "bad.yaml", dlpfc_dir, priors_dir, out, bad=True)
    rc = main(["build-graphs", "-c", str(cfg_bad), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "'broken'" in err
    assert not (out / "broken.pt").exists()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # no partial file
    m = json.loads((out / "manifest.json").read_text())
    assert [e["name"] for e in m["slides"]] == ["151673"] and "broken" in m["failed"]
    assert f.is_file()

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(spot, near, spot)" in text and "3639" in text and "tf_targets" in text
    assert main(["inspect", str(f)]) == 0
    assert "patch_2" in capsys.readouterr().out
