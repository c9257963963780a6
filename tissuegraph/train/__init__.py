"""Self-supervised pretraining: objectives, spatial-tile sampler, training loop, inference.

The configs import without torch (so the CLI checks a config before loading torch); the
rest is imported on first use.
"""

from __future__ import annotations

import importlib

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


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:  # a submodule, e.g. ``tissuegraph.train.loop`` after ``import tissuegraph.train``
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
