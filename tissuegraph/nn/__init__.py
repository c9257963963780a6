"""Neural network layers of tissuegraph: encoders, the heterogeneous GNN, heads, registry."""

from tissuegraph.nn.config import ImageEncoderConfig, ModelConfig
from tissuegraph.nn.encoders import (
    ExpressionEncoder,
    FeatureEncoder,
    ImageEncoder,
    check_timm_name,
    create_backbone,
)
from tissuegraph.nn.gnn import HeteroGNN
from tissuegraph.nn.heads import ExpressionDecoder, LocalisationHead, ProjectionHead
from tissuegraph.nn.model import (
    TissueGraphModel,
    build_model,
    check_data_spec,
    data_spec,
    edge_scalars,
    list_models,
    load_model,
    merge_data_specs,
    model_config,
    register_model,
    save_model,
)

__all__ = [
    "ImageEncoderConfig",
    "ModelConfig",
    "ExpressionEncoder",
    "FeatureEncoder",
    "ImageEncoder",
    "check_timm_name",
    "create_backbone",
    "HeteroGNN",
    "ExpressionDecoder",
    "LocalisationHead",
    "ProjectionHead",
    "TissueGraphModel",
    "build_model",
    "check_data_spec",
    "data_spec",
    "edge_scalars",
    "list_models",
    "load_model",
    "merge_data_specs",
    "model_config",
    "register_model",
    "save_model",
]
