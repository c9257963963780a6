"""The checkpoint format's one reader: both spellings of the weights, typed access, DataSpec."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tissuegraph.errors import InputError
from tissuegraph.graph.schema import DataSpec, data_spec
from tissuegraph.nn import build_model, save_model
from tissuegraph.nn import checkpoint as K
from tissuegraph.nn.model import model_config
from tissuegraph.nn.testing import tiny_graph

SMALL = {"hidden_dim": 16, "expr_hidden_dim": 16, "proj_dim": 8, "heads": 2}


@pytest.fixture(scope="module")
def graph():
    return tiny_graph(n_side=5, n_genes=10, crop_px=16)


@pytest.fixture(scope="module")
def model(graph):
    torch.manual_seed(0)
    return build_model(None, dict(SMALL, image_encoder={"name": "test_resnet"}), data_spec(graph))


def test_model_file_and_training_checkpoint_load_alike(model, graph, tmp_path):
    save_model(model, tmp_path / "m.pt")  # weights under "state_dict"
    training = {  # weights under "model", as tissuegraph pretrain writes them
        K.MODEL: model.state_dict(),
        K.MODEL_CONFIG: model_config(model),
        K.STEP: 7,
        K.BUILD: {K.BUILD_CONFIG: {"seed": 1}, K.GENES: ["A", "B"], K.SCHEMA_VERSION: 1},
        K.PROBE: {"alpha": 1.0},
    }
    torch.save(training, tmp_path / "t.pt")
    ref = model.eval()(graph)["fused"]
    for name in ("m.pt", "t.pt"):
        ck = K.load(tmp_path / name)
        assert torch.allclose(ck.model(graph)["fused"], ref, atol=1e-6)
        assert ck.data_spec == DataSpec.from_graph(graph)
        assert ck.model_config == model_config(model)
        with pytest.raises(dataclasses.FrozenInstanceError):
            ck.step = 3  # type: ignore[misc]
    ck = K.load(tmp_path / "t.pt", model=False)
    assert ck.model is None and ck.step == 7 and ck.genes == ["A", "B"]
    assert ck.build_config == {"seed": 1} and ck.probe == {"alpha": 1.0}
    info = ck.info()
    assert info["schema_version"] == 1 and len(info["checkpoint_hash"]) == 16
    plain = K.load(tmp_path / "m.pt", model=False)
    assert (plain.step, plain.genes, plain.build_config, plain.probe) == (0, [], {}, None)


def test_no_weights_refused(model, tmp_path):
    torch.save({K.MODEL_CONFIG: model_config(model)}, tmp_path / "w.pt")
    with pytest.raises(InputError, match="holds no model weights"):
        K.load(tmp_path / "w.pt")


def test_data_spec_round_trip_and_checks(graph):
    d = data_spec(graph)
    spec = DataSpec.from_dict(d)
    assert spec.to_dict() == d and list(spec.to_dict()) == list(d)
    std = spec.with_standardization({"n_pcs": 4, "clip": 10.0})
    assert list(std.to_dict())[-3:] == ["std_scale", "std_pcs", "std_clip"]
    assert DataSpec.from_dict(std.to_dict()) == std
    other = DataSpec.from_graph(tiny_graph(n_side=5, n_genes=11))
    with pytest.raises(InputError, match="n_genes"):
        spec.check_fits(other)
    with pytest.raises(InputError, match="in n_genes"):
        DataSpec.merge([spec, other], ["a", "b"])
    fewer = dataclasses.replace(spec, edge_types=spec.edge_types[:1])
    merged = DataSpec.merge([fewer, spec])
    assert merged.edge_types == spec.edge_types
    with pytest.raises(InputError, match="edge type"):
        fewer.check_fits(spec)
