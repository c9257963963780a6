"""Self-supervised pretraining: objectives, spatial-tile sampler, training loop, inference."""

from tissuegraph.train.checkpoint import load_model
from tissuegraph.train.config import ObjectiveConfig, PretrainConfig, TrainConfig
from tissuegraph.train.infer import embed_graph, predict_graph
from tissuegraph.train.loop import Trainer, pretrain

__all__ = [
    "ObjectiveConfig",
    "PretrainConfig",
    "TrainConfig",
    "Trainer",
    "embed_graph",
    "load_model",
    "predict_graph",
    "pretrain",
]
