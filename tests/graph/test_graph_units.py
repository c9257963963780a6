"""Fast unit tests of the graph builders on tiny synthetic inputs."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tissuegraph.errors import ConfigError, InputError
from tissuegraph.graph import schema as S
from tissuegraph.graph.config import BuildConfig
from tissuegraph.graph.genes import normalize_counts, panel_matrix, select_hvg, topk_per_row
from tissuegraph.graph.patches import patch_hierarchy, validate_sizes
from tissuegraph.graph.priors import PriorTables, prior_edges
from tissuegraph.graph.spatial import (
    delaunay_graph,
    edge_lengths,
    grid_graph,
    grid_offsets,
    knn_graph,
    radius_graph,
    spot_graph,
)
from tissuegraph.graph.storage import load_graph, save_graph


def hex_lattice(n_rows=20, n_cols=40, spacing=100.0):
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    m = (r + c) % 2 == 0
    rc = np.stack([r[m], c[m]], 1)
    pos = np.stack([rc[:, 1] * spacing / 2, rc[:, 0] * spacing * np.sqrt(3) / 2], 1)
    return rc, pos


def interior(rc, margin):
    return (
        (rc[:, 0] >= margin)
        & (rc[:, 0] <= rc[:, 0].max() - margin)
        & (rc[:, 1] >= 2 * margin)
        & (rc[:, 1] <= rc[:, 1].max() - 2 * margin)
    )


def assert_symmetric_no_loops(ei, n):
    assert ei.dtype == np.int64 and ei.shape[0] == 2
    assert not np.any(ei[0] == ei[1])
    a = set(zip(ei[0].tolist(), ei[1].tolist()))
    assert a == set(zip(ei[1].tolist(), ei[0].tolist()))
    assert len(a) == ei.shape[1]  # no duplicates
    assert ei.max() < n


@pytest.mark.parametrize(
    "grid,rings,neigh,expected",
    [
        ("hex", 1, 4, 6),
        ("hex", 2, 4, 18),
        ("hex", 3, 4, 36),
        ("square", 1, 4, 4),
        ("square", 2, 4, 12),
        ("square", 1, 8, 8),
        ("square", 2, 8, 24),
    ],
)
def test_grid_offsets_counts(grid, rings, neigh, expected):
    assert len(grid_offsets(grid, rings, neigh)) == expected


def test_hex_grid_degrees_and_lengths():
    rc, pos = hex_lattice()
    for rings, deg_in, max_len in [(1, 6, 100.0), (2, 18, 200.0)]:
        ei = grid_graph(rc, "hex", rings)
        assert_symmetric_no_loops(ei, len(rc))
        deg = np.bincount(ei[0], minlength=len(rc))
        assert np.all(deg[interior(rc, rings)] == deg_in)
        assert deg.max() == deg_in
        d = edge_lengths(pos, ei)
        assert d.min() == pytest.approx(100.0, rel=1e-6)
        assert d.max() == pytest.approx(max_len, rel=1e-6)


def test_square_grid_and_shuffled_order():
    x, y = np.meshgrid(np.arange(10), np.arange(12))
    rc = np.stack([y.ravel(), x.ravel()], 1)
    perm = np.random.default_rng(0).permutation(len(rc))
    rc = rc[perm]
    ei4 = grid_graph(rc, "square", 1, 4)
    ei8 = grid_graph(rc, "square", 1, 8)
    assert_symmetric_no_loops(ei4, len(rc))
    d4 = np.abs(rc[ei4[0]] - rc[ei4[1]]).sum(1)
    assert np.all(d4 == 1)
    assert np.bincount(ei8[0]).max() == 8
    with pytest.raises(InputError, match="share the lattice cell"):
        grid_graph(np.vstack([rc, rc[:1]]), "square")
    with pytest.raises(ConfigError):
        grid_offsets("square", 1, 6)


def test_knn_radius_delaunay():
    rc, pos = hex_lattice(12, 24)
    pos = pos + np.random.default_rng(1).normal(0, 2, pos.shape)
    n = len(pos)
    for ei in (knn_graph(pos, 6), radius_graph(pos, 110.0), delaunay_graph(pos)):
        assert_symmetric_no_loops(ei, n)
    k = knn_graph(pos, 4)
    assert np.bincount(k[0], minlength=n).min() >= 4
    r = radius_graph(pos, 110.0)
    assert edge_lengths(pos, r).max() <= 110.0
    d = delaunay_graph(pos)
    assert edge_lengths(pos, d).max() < 2 * 110.0  # long hull edges pruned
    ei, dist = spot_graph(pos, method="knn", k=3)
    assert dist.dtype == np.float32 and dist.shape == (ei.shape[1],)
    with pytest.raises(ConfigError):
        spot_graph(pos, method="nope")
    with pytest.raises(InputError):
        spot_graph(pos, method="grid", array_rc=None)


def test_patch_sizes_must_triple():
    assert validate_sizes([110, 330, 990]) == [110.0, 330.0, 990.0]
    with pytest.raises(ConfigError, match="3x"):
        validate_sizes([110, 300, 900])
    with pytest.raises(ConfigError):
        validate_sizes([])


def test_patch_hierarchy_loc_consistency():
    rng = np.random.default_rng(0)
    pos = rng.uniform(-500, 3000, size=(4000, 2))
    h = patch_hierarchy(pos, [100, 300, 900, 2700], origin_um=(13.0, -7.0))
    assert h.n_levels == 4
    np.testing.assert_array_equal(h.pos[0], pos)
    for k in range(3):
        child, s = h.pos[k], h.sizes_um[k + 1]
        par = h.pos[k + 1][h.parent[k]]
        cell = np.floor((child - (par - s / 2)) / (s / 3)).astype(int)
        assert cell.min() >= 0 and cell.max() <= 2  # child centre inside its parent
        np.testing.assert_array_equal(3 * cell[:, 1] + cell[:, 0], h.loc[k])
        assert set(np.unique(h.parent[k])) == set(range(len(h.pos[k + 1])))  # no empty cell
        # lattice centres sit on the shared origin's lattice
        off = (h.pos[k + 1] - np.array([13.0, -7.0])) / s - 0.5
        np.testing.assert_allclose(off, np.round(off), atol=1e-9)


def test_normalize_and_topk():
    x = sp.csr_matrix(np.array([[1, 0, 3, 0], [0, 0, 0, 0], [2, 2, 0, 4]], np.float32))
    n = normalize_counts(x)
    np.testing.assert_allclose(
        n.toarray()[0], np.log1p(np.array([1, 0, 3, 0]) / 4 * 1e4), rtol=1e-5
    )
    assert n.toarray()[1].sum() == 0
    assert normalize_counts(x, "none").toarray().sum() == x.sum()
    with pytest.raises(ConfigError):
        normalize_counts(x, "tpm")
    r, c, v = topk_per_row(x, 2)
    assert list(zip(r.tolist(), c.tolist())) == [(0, 0), (0, 2), (2, 0), (2, 3)] or list(
        zip(r.tolist(), c.tolist())
    ) == [(0, 0), (0, 2), (2, 1), (2, 3)]
    r0, c0, v0 = topk_per_row(x, 0)
    assert len(r0) == x.nnz
    rng = np.random.default_rng(0)
    big = sp.random(500, 60, density=0.4, format="csr", random_state=1, dtype=np.float32)
    r, c, v = topk_per_row(big, 7, chunk_elems=600)
    dense = big.toarray()
    for i in rng.choice(500, 50, replace=False):
        nz = np.nonzero(dense[i])[0]
        expect = set(nz[np.argsort(-dense[i, nz])[:7]].tolist())
        assert set(c[r == i].tolist()) == expect
    np.testing.assert_allclose(v, dense[r, c])


def test_panel_matrix_missing_and_case():
    x = sp.csr_matrix(np.arange(6, dtype=np.float32).reshape(2, 3))
    m, missing = panel_matrix(x, ["Gfap", "B", "C"], ["C", "GFAP", "ZZZ"])
    np.testing.assert_array_equal(m.toarray(), [[2, 0, 0], [5, 3, 0]])
    assert missing == ["ZZZ"]


def test_hvg_uses_only_fit_slides():
    rng = np.random.default_rng(0)
    n, g = 400, 50
    genes = [f"G{i}" for i in range(g)]

    def slide(var_gene):
        x = rng.poisson(5, size=(n, g)).astype(np.float32)
        x[: n // 2, var_gene] *= 20
        return sp.csr_matrix(x), genes

    slides = {"a": slide(0), "b": slide(0), "held_out": slide(1)}
    fit = {k: slides[k] for k in ("a", "b")}
    top = select_hvg(fit, 3)
    assert top[0] == "G0" and "G1" not in top  # the held-out slide does not leak in
    assert select_hvg({"held_out": slides["held_out"]}, 3)[0] == "G1"
    assert select_hvg(fit, 3, flavor="dispersion")[0] == "G0"


def test_prior_edges_case_insensitive_and_coverage():
    genes = ["Tp53", "MDM2", "CDKN1A", "EGF", "EGFR", "X1"]
    tables = PriorTables(
        tf_targets=(
            np.array(["TP53", "TP53", "TP53", "MYC", "TP53"], dtype=object),
            np.array(["MDM2", "CDKN1A", "TP53", "MDM2", "MDM2"], dtype=object),
            np.array([1, -1, 1, 1, -1], np.float32),
        ),
        ligand_receptor=(
            np.array(["EGF", "EGF"], dtype=object),
            np.array(["EGFR", "ERBB2"], dtype=object),
        ),
        pathways=(
            np.array(["P53", "P53", "P53", "EGFR", "EGFR"], dtype=object),
            np.array(["MDM2", "CDKN1A", "TP53", "EGFR", "ZZZ"], dtype=object),
            np.array([2.0, 1.5, 0.5, 3.0, 1.0], np.float32),
        ),
    )
    pe = prior_edges(genes, tables, min_pathway_genes=3)
    assert pe.regulates.T.tolist() == [[0, 1], [0, 2]]  # self loop and duplicate dropped
    assert pe.regulates_weight.tolist() == [1.0, -1.0]  # first row of a duplicate pair wins
    assert pe.binds.T.tolist() == [[3, 4]]
    assert pe.pathways == ["P53"]  # EGFR has 1 panel gene < 3
    assert sorted(pe.member_of.T.tolist()) == [[0, 0], [1, 0], [2, 0]]
    cov = pe.coverage
    assert cov["tf_targets"]["panel_genes_covered"] == 3
    assert cov["tf_targets"]["edges_kept"] == 2
    assert cov["pathways"]["pathways_kept"] == 1 and cov["pathways"]["pathways_in_table"] == 2


def _tiny_adata(n_rows=6, n_cols=12, genes=("A", "B", "C", "D")):
    ad = pytest.importorskip("anndata")
    import pandas as pd

    rc, pos = hex_lattice(n_rows, n_cols)
    rng = np.random.default_rng(0)
    x = sp.csr_matrix(rng.poisson(2, size=(len(rc), len(genes))).astype(np.float32))
    a = ad.AnnData(
        X=x,
        obs=pd.DataFrame(
            {"in_tissue": 1, "array_row": rc[:, 0], "array_col": rc[:, 1]},
            index=[f"s{i}" for i in range(len(rc))],
        ),
        var=pd.DataFrame({"gene_ids": [f"ID{g}" for g in genes]}, index=list(genes)),
    )
    a.obsm["spatial"] = pos / 0.5
    a.obsm["spatial_um"] = pos
    a.uns["tissuegraph"] = {"platform": "synthetic", "microns_per_pixel": 0.5, "grid": "hex"}
    return a


def test_build_slide_graph_without_image_and_missing_genes():
    from tissuegraph.graph.pipeline import build_slide_graph

    a = _tiny_adata()
    cfg = BuildConfig()
    data = build_slide_graph(a, cfg, genes=["b", "A", "NOPE"], slide_name="tiny", slide_index=3)
    assert data.node_types == [S.SPOT, S.GENE]  # no image -> no patch types
    assert data[S.SPOT].x.dtype == torch.float16 and data[S.SPOT].x.shape == (a.n_obs, 3)
    assert torch.all(data[S.SPOT].x[:, 2] == 0)
    assert data.meta["missing_genes"] == ["NOPE"]
    assert data.meta["gene_ids"] == ["IDB", "IDA", "NOPE"]
    assert torch.all(data[S.SPOT].slide == 3)
    assert data[S.SPOT_NEAR_SPOT].edge_attr.shape == (data[S.SPOT_NEAR_SPOT].edge_index.shape[1], 1)
    ew = data[S.SPOT_EXPRESSES_GENE]
    xs = data[S.SPOT].x.float()
    np.testing.assert_allclose(
        ew.edge_weight.numpy(), xs[ew.edge_index[0], ew.edge_index[1]].numpy(), rtol=1e-3
    )
    assert data.meta["barcodes"] == list(a.obs_names)


def test_save_load_weights_only_and_refuse_code(tmp_path):
    from torch_geometric.data import HeteroData

    data = HeteroData()
    data[S.SPOT].x = torch.ones(3, 2, dtype=torch.float16)
    data[S.SPOT_NEAR_SPOT].edge_index = torch.tensor([[0, 1], [1, 0]])
    data.meta = {"slide": "t", "genes": ["A", "B"], "image": None, "cov": {"a": 1.5}}
    p = save_graph(data, tmp_path / "g.pt")
    # exactly the allow-listed classes are needed
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(p)))
    from tissuegraph.graph.storage import SAFE_GLOBALS

    assert unsafe <= {f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS}
    back = torch.load(p, weights_only=True)
    assert back.meta == data.meta
    g = load_graph(p)
    assert torch.equal(g[S.SPOT].x, data[S.SPOT].x)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"x": Evil()}, fh, protocol=2)
    with pytest.raises(InputError, match="refused"):
        load_graph(bad)
    assert not marker.exists()
    with pytest.raises(InputError):
        load_graph(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def small_sim():
    from tissuegraph.datasets import simulate_slide

    return simulate_slide(300, n_genes=60, seed=1, image=True)


def test_frozen_encoder_features_and_pathway_order(small_sim):
    from tissuegraph.graph.pipeline import build_slide_graph

    cfg = BuildConfig()
    cfg.patches.sizes_um = [110.0, 330.0]
    cfg.patches.encoder.name = "resnet18"  # random init: no download
    cfg.patches.encoder.device = "cpu"
    cfg.patches.encoder.batch_size = 128
    genes = list(small_sim.var_names[:20])
    tables = PriorTables(
        pathways=(
            np.array(["P1"] * 3 + ["P2"] * 3, dtype=object),
            np.array([g.upper() for g in genes[:6]], dtype=object),
            np.ones(6, np.float32),
        )
    )
    g = build_slide_graph(
        small_sim, cfg, genes=genes, pathways=["P2", "NEW", "P1"], slide_name="sim", priors=tables
    )
    assert S.patch_types(g) == ["patch_0", "patch_1"]
    f = g["patch_0"].feat
    assert f.dtype == torch.float16 and f.shape == (small_sim.n_obs, 512)
    assert "img" not in g["patch_0"] and torch.isfinite(f.float()).all()
    assert g["patch_1"].feat.shape[0] == g["patch_1"].num_nodes
    assert g.meta["patch_feature"] == "feat"
    # a given pathway order (e.g. a checkpoint's) is kept, unknown pathways have no edges
    assert g.meta["pathways"] == ["P2", "NEW", "P1"]
    mem = g[S.GENE_MEMBER_OF_PATHWAY].edge_index
    assert set(mem[1].tolist()) == {0, 2}
    assert set(mem[0][mem[1] == 0].tolist()) == {3, 4, 5}


def test_build_graphs_synthetic(tmp_path):
    from tissuegraph.graph.pipeline import build_graphs
    from tissuegraph.graph.storage import read_manifest

    cfg = BuildConfig(out_dir=str(tmp_path))
    from tissuegraph.graph.config import SlideSpec

    cfg.slides = [SlideSpec(name="sim", format="synthetic", n_spots=300, seed=2)]
    cfg.panel.mode = "all"
    cfg.patches.enabled = False
    m = build_graphs(cfg, progress=False)
    assert m["slides"][0]["node_counts"] == {"spot": 300, "gene": len(m["genes"])}
    assert read_manifest(tmp_path)["config_hash"] == m["config_hash"]
    g = load_graph(tmp_path / "sim.pt")
    assert g.node_types == [S.SPOT, S.GENE] and g.meta["platform"] == "synthetic"
    bad = BuildConfig(out_dir=str(tmp_path), slides=cfg.slides)
    bad.patches.sizes_um = [100.0, 200.0]
    with pytest.raises(ConfigError, match="3x"):
        build_graphs(bad, progress=False)


def test_build_graphs_parallel_with_failing_slide(tmp_path, capsys):
    from tissuegraph.errors import TissueGraphError
    from tissuegraph.graph.config import SlideSpec
    from tissuegraph.graph.pipeline import build_graphs
    from tissuegraph.graph.storage import read_manifest

    cfg = BuildConfig(out_dir=str(tmp_path), n_jobs=2)
    cfg.slides = [
        SlideSpec(name="sim", format="synthetic", n_spots=200, seed=3),
        SlideSpec(name="broken", format="visium", path=str(tmp_path / "nowhere")),
    ]
    cfg.panel.mode = "list"
    cfg.panel.genes = ["TF0", "G0", "G1", "NOT_THERE"]
    cfg.patches.enabled = False
    with pytest.raises(TissueGraphError, match="broken"):
        build_graphs(cfg, progress=False)
    assert "slide 'broken' failed" in capsys.readouterr().err
    assert (tmp_path / "sim.pt").is_file() and not (tmp_path / "broken.pt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    m = read_manifest(tmp_path)
    assert [s["name"] for s in m["slides"]] == ["sim"] and list(m["failed"]) == ["broken"]
    assert m["slides"][0]["missing_genes"] == 1
    g = load_graph(tmp_path / "sim.pt")
    assert g.meta["missing_genes"] == ["NOT_THERE"] and g[S.SPOT].x.shape == (200, 4)
