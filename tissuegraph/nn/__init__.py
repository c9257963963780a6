"""Neural network layers of tissuegraph: encoders, the heterogeneous GNN, heads, registry.

The configs import without torch (so the CLI checks a config before loading torch); the
layers are imported on first use.
"""

from __future__ import annotations

from tissuegraph._utils import lazy_attributes
from tissuegraph.nn.config import ImageEncoderConfig, ModelConfig

_LAZY = {
    "ExpressionEncoder": "tissuegraph.nn.encoders",
    "FeatureEncoder": "tissuegraph.nn.encoders",
    "ImageEncoder": "tissuegraph.nn.encoders",
    "check_timm_name": "tissuegraph.nn.encoders",
    "create_backbone": "tissuegraph.nn.encoders",
    "HeteroGNN": "tissuegraph.nn.gnn",
    "ExpressionDecoder": "tissuegraph.nn.heads",
    "LocalisationHead": "tissuegraph.nn.heads",
    "ProjectionHead": "tissuegraph.nn.heads",
    "TissueGraphModel": "tissuegraph.nn.model",
    "build_model": "tissuegraph.nn.model",
    "check_data_spec": "tissuegraph.nn.model",
    "data_spec": "tissuegraph.nn.model",
    "edge_scalars": "tissuegraph.nn.model",
    "list_models": "tissuegraph.nn.model",
    "load_model": "tissuegraph.nn.model",
    "merge_data_specs": "tissuegraph.nn.model",
    "model_config": "tissuegraph.nn.model",
    "register_model": "tissuegraph.nn.model",
    "save_model": "tissuegraph.nn.model",
}

__all__ = ["ImageEncoderConfig", "ModelConfig", *_LAZY]


__getattr__ = lazy_attributes(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
