"""The checkpoint format, in one place: its key names, the safe reader and :func:`load`.

Two kinds of file share the format; both are dicts of tensors, dicts, lists and primitives
only, read with ``torch.load(weights_only=True)``:

- a model file (:func:`tissuegraph.nn.save_model`): :data:`MODEL_CONFIG` and the weights
  under :data:`STATE_DICT`;
- a training checkpoint (``tissuegraph pretrain``, written by
  :mod:`tissuegraph.train.loop`): the weights under :data:`MODEL`, :data:`OPTIMIZER`,
  :data:`SCHEDULER`, :data:`STEP`, :data:`RNG` (one entry per rank), :data:`SAMPLER` and
  :data:`SAMPLERS` (one per rank), :data:`CONFIG` (the resolved ``PretrainConfig``),
  :data:`MODEL_CONFIG`, :data:`BUILD` (:data:`BUILD_CONFIG`, :data:`GENES`,
  :data:`PATHWAYS`, :data:`SCHEMA_VERSION`, :data:`CONFIG_HASH` from the graphs'
  manifest), :data:`VERSION`, :data:`WORLD_SIZE`; after training with patches,
  :data:`PROBE` (the image -> expression ridge probe of :mod:`tissuegraph.train.probe`).

:data:`MODEL_CONFIG` is ``{"name", "cfg", "data_spec"}`` (:data:`MC_NAME`, :data:`MC_CFG`,
:data:`MC_DATA_SPEC`): everything needed to rebuild the model. The weights are read from
:data:`MODEL`, else :data:`STATE_DICT` (:func:`weights`), so both kinds load everywhere.

This module is the only reader: everything else calls :func:`load` (or :func:`read` for the
raw dict) and uses the constants below instead of string literals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from tissuegraph.errors import InputError
from tissuegraph.graph.schema import DataSpec

__all__ = ["Checkpoint", "load", "read", "weights"]

# top-level keys
MODEL = "model"  # the weights in a training checkpoint
STATE_DICT = "state_dict"  # the weights in a model file
MODEL_CONFIG = "model_config"
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler"
STEP = "step"
RNG = "rng"
SAMPLER = "sampler"
SAMPLERS = "samplers"
CONFIG = "config"
BUILD = "build"
VERSION = "tissuegraph_version"
WORLD_SIZE = "world_size"
PROBE = "probe"
# MODEL_CONFIG entries
MC_NAME = "name"
MC_CFG = "cfg"
MC_DATA_SPEC = "data_spec"
# BUILD entries
BUILD_CONFIG = "build_config"
GENES = "genes"
PATHWAYS = "pathways"
SCHEMA_VERSION = "schema_version"
CONFIG_HASH = "config_hash"


def read(path: str | os.PathLike) -> dict:
    """The raw dict of a model file or training checkpoint (``weights_only=True``).

    A missing file, a file the safe loader refuses, or one without :data:`MODEL_CONFIG`
    raises a one-line :class:`InputError` (``"<path>: not a tissuegraph checkpoint: <reason>"``).
    """
    from tissuegraph.graph.storage import safe_load

    p = Path(path)
    obj = safe_load(p, "checkpoint")
    if not isinstance(obj, dict):
        raise InputError(
            f"{p}: not a tissuegraph checkpoint: it holds a {type(obj).__name__}, not a dict"
        )
    if MODEL_CONFIG not in obj:
        raise InputError(
            f"{p}: not a tissuegraph checkpoint: no {MODEL_CONFIG!r} (write it with "
            "tissuegraph pretrain or tissuegraph.nn.save_model)"
        )
    return obj


def weights(obj: dict):
    """The model's state dict: :data:`MODEL` (training checkpoint), else :data:`STATE_DICT`
    (model file), else ``None``."""
    state = obj.get(MODEL)
    return state if state is not None else obj.get(STATE_DICT)


def model_file(model_config: dict, state_dict: dict) -> dict:
    """The dict of a model file (what :func:`tissuegraph.nn.save_model` writes)."""
    return {MODEL_CONFIG: model_config, STATE_DICT: state_dict}


def rebuild(obj: dict, device="cpu", *, where: str = "checkpoint"):
    """The model a checkpoint dict describes, with its weights, in eval mode on ``device``.

    The image backbone is created without downloading weights (they are in the file)."""
    from tissuegraph.nn.model import build_model

    if MODEL_CONFIG not in obj:
        raise InputError(f"{where} is not a tissuegraph checkpoint (no {MODEL_CONFIG!r})")
    mc = obj[MODEL_CONFIG]
    state = weights(obj)
    if state is None:
        raise InputError(f"{where} holds no model weights")
    model = build_model(mc[MC_NAME], mc[MC_CFG], mc[MC_DATA_SPEC], load_backbone_weights=False)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise InputError(
            f"{where} does not match the model it describes: "
            f"{str(exc).strip().splitlines()[-1].strip()[:200]}"
        ) from exc
    if missing or unexpected:
        raise InputError(
            f"{where} does not match the model it describes ({len(missing)} missing, "
            f"{len(unexpected)} unexpected weights, e.g. {(missing or unexpected)[:2]})"
        )
    return model.to(device).eval()


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (when asked for) and typed access to the rest.

    ``raw`` is the dict as read (for what has no accessor: optimizer, RNG and sampler
    states); the accessors read both kinds of file (a model file has no build record, step
    or probe: they read empty / 0 / ``None``).
    """

    path: Path | None
    raw: dict = field(repr=False)
    model: Any = field(default=None, repr=False)

    @property
    def model_config(self) -> dict:
        """``{"name", "cfg", "data_spec"}``."""
        return self.raw[MODEL_CONFIG]

    @property
    def model_cfg(self) -> dict:
        return self.model_config[MC_CFG]

    @property
    def data_spec(self) -> DataSpec:
        """What the model was built for."""
        return DataSpec.from_dict(self.model_config[MC_DATA_SPEC])

    @property
    def state_dict(self):
        return weights(self.raw)

    @property
    def build(self) -> dict:
        """The graphs' build record (empty for a model file)."""
        return self.raw.get(BUILD, {}) or {}

    @property
    def build_config(self) -> dict:
        return self.build.get(BUILD_CONFIG, {})

    @property
    def genes(self) -> list:
        return list(self.build.get(GENES, []))

    @property
    def pathways(self) -> list:
        return list(self.build.get(PATHWAYS, []))

    @property
    def schema_version(self):
        return self.build.get(SCHEMA_VERSION)

    @property
    def config(self) -> dict:
        """The resolved training config (empty for a model file)."""
        return self.raw.get(CONFIG, {})

    @property
    def step(self) -> int:
        return int(self.raw.get(STEP, 0))

    @property
    def world_size(self) -> int:
        return int(self.raw.get(WORLD_SIZE, 1))

    @property
    def probe(self) -> dict | None:
        """The image -> expression probe (``None`` when the checkpoint has none)."""
        return self.raw.get(PROBE)

    @cached_property
    def checkpoint_hash(self) -> str | None:
        from tissuegraph._utils import file_hash

        return file_hash(self.path) if self.path is not None else None

    def info(self) -> dict:
        """The plain summary :mod:`tissuegraph.tl` passes around with the model:
        ``build_config``, ``genes``, ``pathways``, ``schema_version``, ``config``,
        ``model_config``, ``step``, ``checkpoint_hash``, ``probe``."""
        return {
            "build_config": self.build_config,
            "genes": self.genes,
            "pathways": self.pathways,
            "schema_version": self.schema_version,
            "config": self.config,
            "model_config": self.model_config,
            "step": self.step,
            "checkpoint_hash": self.checkpoint_hash,
            "probe": self.probe,
        }


def load(path: str | os.PathLike, device="cpu", *, model: bool = True) -> Checkpoint:
    """Read the checkpoint at ``path``; with ``model`` (the default) rebuild the model in eval
    mode on ``device`` (``"auto"``: CUDA when available)."""
    from tissuegraph._utils import resolve_device

    p = Path(path)
    raw = read(p)
    m = rebuild(raw, resolve_device(device), where=str(p)) if model else None
    return Checkpoint(path=p, raw=raw, model=m)
