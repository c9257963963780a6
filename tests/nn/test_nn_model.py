"""Model forward/backward, save/load, timm backbones, registry (tiny schema graph)."""

from __future__ import annotations

import pytest
import timm
import torch

from tissuegraph.errors import ConfigError, InputError
from tissuegraph.graph import schema as S
from tissuegraph.nn import build_model, data_spec, list_models, load_model, save_model
from tissuegraph.nn.model import check_data_spec
from tissuegraph.nn.testing import tiny_graph

SMALL = {"hidden_dim": 16, "expr_hidden_dim": 16, "proj_dim": 8, "heads": 2}


@pytest.fixture(scope="module")
def graph():
    return tiny_graph(n_side=6, n_genes=12, crop_px=16)


def _small(**kw):
    cfg = dict(SMALL, image_encoder={"name": "test_resnet"})
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("fusion", ["early", "middle", "late"])
@pytest.mark.parametrize("conv", ["sage", "graphconv", "gatv2", "hgt"])
def test_forward_backward(graph, fusion, conv):
    torch.manual_seed(0)
    model = build_model(None, _small(fusion=fusion, conv=conv), data_spec(graph))
    out = model(graph)
    n = graph[S.SPOT].num_nodes
    for key in ("fused", "expr", "image"):
        assert out[key].shape == (n, 16)
        assert torch.isfinite(out[key]).all()
    pred = model.predict_expression(out["fused"])
    assert pred.shape == (n, 12)
    loss = out["fused"].pow(2).mean() + out["image"].pow(2).mean() + pred.pow(2).mean()
    loss.backward()
    g = model.expr_encoder.net[0].weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    gi = model.image_encoder.proj.weight.grad
    assert gi is not None and gi.abs().sum() > 0


def test_middle_fusion_passes_messages(graph):
    """In middle fusion the spot embedding depends on the image; in late it does not."""
    torch.manual_seed(0)
    for fusion, depends in (("middle", True), ("late", False)):
        model = build_model(None, _small(fusion=fusion, dropout=0.0), data_spec(graph)).eval()
        g2 = graph.clone()
        g2[S.patch(0)][S.IMG] = torch.zeros_like(g2[S.patch(0)][S.IMG])
        a, b = model(graph)["expr"], model(g2)["expr"]
        assert (not torch.allclose(a, b)) == depends


def test_feature_input_and_no_patches():
    g = tiny_graph(n_side=5, n_genes=10, feat_dim=7)
    model = build_model(None, _small(), data_spec(g))
    assert model(g)["image"].shape == (25, 16)
    g0 = tiny_graph(n_side=5, n_genes=10, n_scales=0)
    out = build_model(None, _small(), data_spec(g0))(g0)
    assert out["image"] is None and out["fused"].shape == (25, 16)


def test_mask_token_hides_expression(graph):
    model = build_model(None, _small(dropout=0.0), data_spec(graph)).eval()
    x = graph[S.SPOT][S.X]
    m = torch.zeros(x.shape[0], dtype=torch.bool)
    m[:3] = True
    h1 = model.expr_encoder(x, m)
    h2 = model.expr_encoder(torch.randn_like(x.float()), m)
    assert torch.equal(h1[:3], h2[:3])


def test_save_load_round_trip_weights_only(graph, tmp_path):
    torch.manual_seed(0)
    model = build_model(None, _small(conv="gatv2"), data_spec(graph)).eval()
    p = save_model(model, tmp_path / "m.pt")
    obj = torch.load(p, weights_only=True)  # only tensors / dicts / lists / primitives
    assert set(obj) == {"model_config", "state_dict"}
    again = load_model(p)
    a, b = model(graph), again(graph)
    assert torch.allclose(a["fused"], b["fused"], atol=1e-6)


def test_checkpoint_not_matching(graph, tmp_path):
    model = build_model(None, _small(), data_spec(graph))
    obj = {
        "model_config": {
            "name": "hetero_gnn",
            "cfg": _small(hidden_dim=32),
            "data_spec": data_spec(graph),
        },
        "state_dict": model.state_dict(),
    }
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="does not match"):
        load_model(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a tissuegraph checkpoint"):
        load_model(tmp_path / "junk.pt")
    other = tiny_graph(n_side=5, n_genes=11)
    with pytest.raises(InputError, match="n_genes"):
        check_data_spec(model.data_spec, data_spec(other))


def test_timm_checkpoint_path(graph, tmp_path):
    torch.manual_seed(1)
    ref = timm.create_model("test_resnet", num_classes=10)  # with a classifier: ignored on load
    torch.save(ref.state_dict(), tmp_path / "backbone.pth")
    model = build_model(
        None,
        dict(
            SMALL,
            image_encoder={
                "name": "test_resnet",
                "checkpoint_path": str(tmp_path / "backbone.pth"),
            },
        ),
        data_spec(graph),
    )
    w_ref = ref.state_dict()["conv1.weight"] if "conv1.weight" in ref.state_dict() else None
    sd = model.image_encoder.backbone.state_dict()
    key = next(k for k in sd if k.endswith("weight") and sd[k].ndim == 4)
    assert torch.equal(sd[key], ref.state_dict()[key])
    if w_ref is not None:
        assert torch.equal(sd["conv1.weight"], w_ref)
    # weights of another architecture do not fit
    torch.save(timm.create_model("test_efficientnet").state_dict(), tmp_path / "other.pth")
    with pytest.raises(InputError, match="do not fit"):
        build_model(
            None,
            dict(
                SMALL,
                image_encoder={
                    "name": "test_resnet",
                    "checkpoint_path": str(tmp_path / "other.pth"),
                },
            ),
            data_spec(graph),
        )


def test_unknown_timm_name_lists_close_matches(graph):
    with pytest.raises(ConfigError) as exc:
        build_model(None, dict(SMALL, image_encoder={"name": "resnet1"}), data_spec(graph))
    msg = str(exc.value)
    assert "\n" not in msg and "resnet1" in msg and "close matches" in msg


def test_frozen_encoder_and_registry(graph):
    model = build_model(
        None, dict(SMALL, image_encoder={"name": "test_resnet", "freeze": True}), data_spec(graph)
    )
    model.train()
    assert not model.image_encoder.backbone.training
    assert all(not p.requires_grad for p in model.image_encoder.backbone.parameters())
    assert "hetero_gnn" in list_models()
    with pytest.raises(ConfigError, match="not a registered model"):
        build_model("nope", SMALL, data_spec(graph))
    with pytest.raises(ConfigError, match="fusion"):
        build_model(None, _small(fusion="sideways"), data_spec(graph))


def test_bilinear_head_equals_torch_bilinear():
    import torch

    from tissuegraph.nn.heads import Bilinear

    for out in (1, 3):
        a = Bilinear(8, 5, out)
        b = torch.nn.Bilinear(8, 5, out)
        b.load_state_dict(a.state_dict())
        x, y = torch.randn(16, 8, requires_grad=True), torch.randn(16, 5)
        torch.testing.assert_close(a(x, y), b(x, y), rtol=1e-5, atol=1e-5)
        (ga,) = torch.autograd.grad(a(x, y).sum(), x)
        (gb,) = torch.autograd.grad(b(x, y).sum(), x)
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)


def test_gcn_normalisation_is_cached_per_graph_and_equals_pyg_gcnconv():
    import torch
    from torch_geometric.nn import GCNConv

    from tissuegraph.graph import schema as S
    from tissuegraph.nn.gnn import HeteroGNN

    torch.manual_seed(0)
    n, d = 30, 8
    gnn = HeteroGNN([S.SPOT], [S.SPOT_NEAR_SPOT], d, 1, conv="gcn", residual=False, norm=False)
    gnn.eval()
    conv = gnn.layers[0].convs[S.SPOT_NEAR_SPOT]
    ref = GCNConv(d, d, add_self_loops=True, normalize=True)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(n, d)

    def graph():
        ei = torch.randint(0, n, (2, 90))
        return ei[:, ei[0] != ei[1]], torch.rand(int((ei[0] != ei[1]).sum())) + 0.5

    for _ in range(2):  # a second graph is normalised anew, not served from the cache
        ei, w = graph()
        got = gnn({S.SPOT: x}, {S.SPOT_NEAR_SPOT: ei}, {S.SPOT_NEAR_SPOT: w})[S.SPOT]
        want = gnn.act(ref(x, ei, w))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        cached = gnn._gcn_cache[3]
        gnn({S.SPOT: x}, {S.SPOT_NEAR_SPOT: ei}, {S.SPOT_NEAR_SPOT: w.clone()})
        assert gnn._gcn_cache[3] is cached  # same graph, equal weights: reused
        w2 = w.clone()
        w2[0] += 1.0
        got2 = gnn({S.SPOT: x}, {S.SPOT_NEAR_SPOT: ei}, {S.SPOT_NEAR_SPOT: w2})[S.SPOT]
        torch.testing.assert_close(got2, gnn.act(ref(x, ei, w2)), rtol=1e-5, atol=1e-5)
    # the cache is not model state: the module pickles, and the copy starts without it
    import pickle

    assert pickle.loads(pickle.dumps(gnn))._gcn_cache is None


@pytest.mark.parametrize("conv", ["gcn", "sage", "hgt"])
def test_narrow_embedding_and_linear_output(graph, conv):
    """``out_dim`` narrows the last layer (the embedding); every head works on it, and
    ``final_activation=False`` leaves the last convolution's output linear (negative values
    stay; GELU would bound them below by about -0.17)."""
    torch.manual_seed(0)
    cfg = _small(conv=conv, hidden_dim=16, out_dim=6, final_activation=False, norm=False)
    model = build_model(None, cfg, data_spec(graph))
    out = model(graph)
    n = graph[S.SPOT].num_nodes
    assert model.dim == 6
    assert out["fused"].shape == (n, 6) and out["image"].shape == (n, 6)
    assert out["fused"].min() < -0.2
    assert model.predict_expression(out["fused"]).shape == (n, 12)
    assert model.recon_head(out["fused"]).shape[0] == n
    assert model.discriminator(out["fused"], out["fused"]).shape == (n, 1)
    ei = graph[S.patch_in_parent(0)].edge_index[:, :10]
    assert model.localisation_logits(graph, out, 0, ei).shape == (10, S.N_LOC)
    assert model.proj_child(out["enc"][S.patch(0)]).shape[-1] == 8
    out["fused"].pow(2).mean().backward()
    for fusion in ("early", "late"):
        with pytest.raises(ConfigError, match="out_dim"):
            build_model(None, _small(fusion=fusion, out_dim=6), data_spec(graph))


def test_gatv2_spot_attends_to_itself():
    """With ``conv=gatv2`` and no residual, a spot's own expression reaches its embedding
    through the attention's self-loop (one layer: without it only neighbours would)."""
    torch.manual_seed(0)
    g = tiny_graph(n_side=5, n_genes=12, n_scales=0)
    cfg = dict(SMALL, conv="gatv2", n_layers=1, residual=False, norm=False, use_genes=False)
    model = build_model(None, cfg, data_spec(g)).eval()
    g2 = g.clone()
    g2[S.SPOT][S.X][0] = g2[S.SPOT][S.X][0] * 0 + 5.0
    a, b = model(g)["fused"], model(g2)["fused"]
    assert not torch.allclose(a[0], b[0])
