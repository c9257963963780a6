"""embed / predict_expression refuse a slide the checkpoint cannot read: too few of its panel
genes, or values of another kind than it was trained on."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tissuegraph import tl
from tissuegraph.datasets import simulate_slide
from tissuegraph.errors import InputError
from tissuegraph.graph import schema as S


class StandIn(torch.nn.Module):
    def __init__(self, n_genes: int, dim: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.expr = torch.nn.Linear(n_genes, dim)
        self.head = torch.nn.Linear(dim, n_genes)

    def embed(self, data, kind="fused"):
        return self.expr(data[S.SPOT][S.X].float())


@pytest.fixture
def fake_infer(monkeypatch):
    mod = types.ModuleType("tissuegraph.train.infer")

    def embed_graph(model, data, *, kind="fused", batch_spots=None, device="cpu"):
        with torch.no_grad():
            return model.embed(data).numpy()

    def predict_graph(model, data, *, batch_spots=None, device="cpu", image_only=False):
        with torch.no_grad():
            return model.head(model.embed(data)).numpy()

    mod.embed_graph, mod.predict_graph = embed_graph, predict_graph
    monkeypatch.setitem(sys.modules, "tissuegraph.train.infer", mod)
    import tissuegraph.train as train_pkg

    monkeypatch.setattr(train_pkg, "infer", mod, raising=False)
    return mod


@pytest.fixture(scope="module")
def slide():
    return simulate_slide(120, n_genes=40, n_niches=2, n_cell_types=2, seed=3, image=False)


def _ckpt(genes, normalize="log1p_cp10k", slides=None):
    info = {
        "genes": list(genes),
        "pathways": [],
        "build_config": {
            "panel": {"mode": "list"},
            "normalize": {"method": normalize},
            "patches": {"enabled": False},
            "slides": slides or [],
        },
        "checkpoint_hash": "h",
        "step": 1,
    }
    return StandIn(len(genes)), info


def test_embed_refuses_a_slide_without_the_panel(slide, fake_infer):
    genes = [f"OTHER{i}" for i in range(300)]
    with pytest.raises(InputError) as e:
        tl.embed(slide.copy(), _ckpt(genes), device="cpu")
    msg = str(e.value)
    assert "shares 0 of the checkpoint's 300 panel genes (0%, min_gene_overlap=50%)" in msg
    assert "\n" not in msg


def test_overlap_threshold(slide, fake_infer):
    shared = list(slide.var_names[:20])
    genes = shared + [f"OTHER{i}" for i in range(20)]  # exactly half
    a = slide.copy()
    with pytest.warns(UserWarning, match="20 of 40 panel genes are missing"):
        tl.embed(a, _ckpt(genes), device="cpu")
    assert a.obsm["X_tissuegraph"].shape == (120, 4)
    assert a.uns["X_tissuegraph"]["params"]["min_gene_overlap"] == 0.5
    with pytest.raises(InputError, match="shares 20 of the checkpoint's 40 panel genes"):
        tl.embed(slide.copy(), _ckpt(genes), device="cpu", min_gene_overlap=0.6)
    with pytest.raises(InputError, match="min_gene_overlap must lie in"):
        tl.embed(slide.copy(), _ckpt(genes), device="cpu", min_gene_overlap=2)


def test_gene_ids_hint(slide, fake_infer):
    a = slide.copy()
    a.var["gene_ids"] = [f"ENSG{i:011d}" for i in range(a.n_vars)]
    genes = list(a.var["gene_ids"])
    with pytest.raises(InputError, match=r"var\['gene_ids'\] match 40: use them as var_names"):
        tl.embed(a, _ckpt(genes), device="cpu")


def test_normalised_values_refused_where_counts_were_trained(slide, fake_infer):
    import scanpy as sc

    a = slide.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    with pytest.raises(InputError) as e:
        tl.embed(a, _ckpt(slide.var_names), device="cpu")
    msg = str(e.value)
    assert "adata.X holds non-integer values (non-zero values: max" in msg
    assert "expects raw counts" in msg and "normalize.method=log1p_cp10k" in msg


def test_counts_refused_where_normalised_values_were_trained(slide, fake_infer):
    slides = [{"name": "s", "format": "h5ad", "expression": "normalized"}]
    a = slide.copy()
    X = np.asarray(a.X.todense(), dtype=np.float32)
    X[0, 0] = 500.0
    a.X = sp.csr_matrix(X)
    with pytest.raises(InputError, match="holds raw counts .* trained on normalized values"):
        tl.embed(a, _ckpt(slide.var_names, "none", slides), device="cpu")
    b = slide.copy()
    b.X = sp.csr_matrix(np.log1p(np.asarray(b.X.todense())))
    tl.embed(b, _ckpt(slide.var_names, "none", slides), device="cpu")


@pytest.mark.parametrize(("value", "kind"), [(np.nan, "NaN"), (-1.0, "negative")])
def test_bad_values_refused(slide, fake_infer, value, kind):
    a = slide.copy()
    X = np.asarray(a.X.todense(), dtype=np.float32)
    X[3, 2] = value
    a.X = X
    with pytest.raises(InputError, match=f"embed: adata.X: 1 invalid value.*1 {kind}"):
        tl.embed(a, _ckpt(slide.var_names), device="cpu")


def test_predict_expression_guard(slide, fake_infer):
    genes = [f"OTHER{i}" for i in range(300)]
    with pytest.raises(InputError, match="predict_expression: the slide shares 0 of"):
        tl.predict_expression(slide, _ckpt(genes), device="cpu")
    # without measured expression (image only) there is nothing to compare
    a = slide.copy()
    a.X = sp.csr_matrix(a.shape, dtype=np.float32)
    out = tl.predict_expression(a, _ckpt(genes), device="cpu")
    assert out.shape == (120, 300)


def test_cli_embed_with_a_foreign_panel(tmp_path, data_dir, capsys):
    """The issue's case, end to end: a real checkpoint file whose 300-gene panel the slide
    does not share; exit status 2, one line naming both numbers, no output file."""
    from tissuegraph.cli import main
    from tissuegraph.nn import build_model, data_spec
    from tissuegraph.nn.model import model_config
    from tissuegraph.nn.testing import tiny_graph

    g = tiny_graph(n_side=4, n_genes=300, n_pathways=0, n_scales=0)
    small = {"hidden_dim": 8, "expr_hidden_dim": 8, "proj_dim": 4, "heads": 1}
    model = build_model(None, small, data_spec(g))
    ckpt = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model_config": model_config(model),
            "model": model.state_dict(),
            "build": {"genes": [f"GENE{i}" for i in range(300)], "build_config": {}},
        },
        ckpt,
    )
    out = tmp_path / "o.h5ad"
    argv = ["embed", "--checkpoint", str(ckpt), "--input", str(data_dir / "visium_toy")]
    rc = main([*argv, "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists()
    assert err.startswith("tissuegraph: error: embed: the slide shares 0 of the checkpoint's 300")
    assert "\n" not in err
