"""Self-supervised pretraining: objectives, spatial-tile sampler, training loop, inference.

The configs import without torch (so the CLI checks a config before loading torch); the
rest is imported on first use.
"""

from __future__ import annotations

from tissuegraph._utils import lazy_attributes
from tissuegraph.train.config import ObjectiveConfig, PretrainConfig, TrainConfig

_LAZY = {
    "load_model": "tissuegraph.train.checkpoint",
    "embed_graph": "tissuegraph.train.infer",
    "predict_graph": "tissuegraph.train.infer",
    "Trainer": "tissuegraph.train.loop",
    "pretrain": "tissuegraph.train.loop",
}

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


__getattr__ = lazy_attributes(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
