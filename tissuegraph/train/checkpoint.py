"""Training checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors, dicts, lists and primitives only:
``model`` (state dict), ``optimizer``, ``scheduler``, ``step``, ``rng`` (one entry per rank:
python / numpy / torch / cuda states as lists and tensors), ``sampler`` (epoch, position),
``config`` (the resolved PretrainConfig), ``model_config`` (``{"name", "cfg", "data_spec"}``),
``build`` (``build_config``, ``genes``, ``pathways``, ``schema_version``, ``config_hash`` from
the graphs' manifest), ``tissuegraph_version``, ``world_size``; after training with patches,
``probe`` (the image -> expression ridge probe of :mod:`tissuegraph.train.probe`).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from tissuegraph._utils import atomic_path, file_hash
from tissuegraph.nn.model import read_checkpoint as read_model_file

__all__ = ["save_checkpoint", "read_checkpoint", "load_model", "rng_state", "set_rng_state"]


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
    if torch.cuda.is_available():
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
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, renamed on success."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint with ``weights_only=True``; one-line :class:`InputError` on failure."""
    return read_model_file(path)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the pretrained model from a checkpoint.

    Returns
    -------
    model
        The model in eval mode on ``device``.
    info
        ``build_config`` (dict), ``genes``, ``pathways``, ``config`` (the training config),
        ``model_config``, ``step``, ``checkpoint_hash``, ``probe`` (``None`` when the
        checkpoint has none).
    """
    from tissuegraph.nn.model import load_model as _load

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    obj = read_checkpoint(path)
    state = obj.get("model", obj.get("state_dict"))
    model = _load({"model_config": obj["model_config"], "state_dict": state}, device)
    build = obj.get("build", {}) or {}
    info = {
        "build_config": build.get("build_config", {}),
        "genes": list(build.get("genes", [])),
        "pathways": list(build.get("pathways", [])),
        "schema_version": build.get("schema_version"),
        "config": obj.get("config", {}),
        "model_config": obj["model_config"],
        "step": int(obj.get("step", 0)),
        "checkpoint_hash": file_hash(path),
        "probe": obj.get("probe"),
    }
    return model, info
