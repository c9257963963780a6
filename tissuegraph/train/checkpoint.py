"""Training checkpoints: training state (RNG), written atomically.

The format (key names, the safe reader, :func:`load` and :class:`Checkpoint`) lives in
:mod:`tissuegraph.nn.checkpoint` and is re-exported here.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from tissuegraph._utils import atomic_path, cuda_available
from tissuegraph.nn.checkpoint import Checkpoint, load
from tissuegraph.nn.checkpoint import read as read_checkpoint

__all__ = [
    "Checkpoint",
    "load",
    "save_checkpoint",
    "read_checkpoint",
    "load_model",
    "rng_state",
    "set_rng_state",
]


def rng_state() -> dict:
    """Python / numpy / torch (/ cuda) RNG states as weights-only-safe containers."""
    v, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": [int(v), list(state), gauss],
        "numpy": [
            name,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
    }
    if cuda_available():
        out["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    v, st, gauss = state["python"]
    random.setstate((int(v), tuple(int(s) for s in st), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(
        (name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached))
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and cuda_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, renamed on success."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the pretrained model from a checkpoint (:func:`load`).

    Returns
    -------
    model
        The model in eval mode on ``device``.
    info
        :meth:`Checkpoint.info`: ``build_config`` (dict), ``genes``, ``pathways``,
        ``config`` (the training config), ``model_config``, ``step``, ``checkpoint_hash``,
        ``probe`` (``None`` when the checkpoint has none).
    """
    ck = load(path, device)
    return ck.model, ck.info()
