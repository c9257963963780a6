"""OmegaConf configs: dataclass defaults <- YAML file <- ``key=value`` overrides."""

from __future__ import annotations

import os
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tissuegraph._utils import write_text_atomic
from tissuegraph.errors import ConfigError, one_line

T = TypeVar("T")


def load_config(schema: type[T], path: str | os.PathLike | None = None, overrides=()) -> T:
    """Merge ``schema`` defaults, the YAML file at ``path`` and dotlist ``overrides``.

    Returns a structured (typed, validated) ``DictConfig`` that behaves like ``schema``.
    Unknown keys and wrong types raise :class:`ConfigError` naming the field.
    """
    cfg = OmegaConf.structured(schema)
    try:
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            try:
                file_cfg = OmegaConf.load(p)
            except Exception as exc:
                raise ConfigError(f"cannot parse config {p}: {one_line(exc, limit=None)}") from exc
            cfg = OmegaConf.merge(cfg, file_cfg)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        msg = one_line(exc, limit=None)
        where = f" (field {key!r})" if key else ""
        src = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{src}{where}: {msg}") from exc
    return cfg  # type: ignore[return-value]


def with_defaults(schema: type[T], cfg: Any = None, *, what: str | None = None) -> T:
    """``schema``'s dataclass defaults <- ``cfg`` (a DictConfig, dict, ``schema`` instance or
    ``None``): a structured (typed, validated) ``DictConfig``.

    With ``what``, a config OmegaConf refuses raises a one-line :class:`ConfigError`
    (``"invalid <what>: ..."``); without it, OmegaConf's own error propagates.
    """
    base = OmegaConf.structured(schema)
    if cfg is None:
        return base  # type: ignore[return-value]
    if is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = OmegaConf.structured(cfg)
    try:
        return OmegaConf.merge(base, cfg)  # type: ignore[return-value]
    except Exception as exc:
        if what is None:
            raise
        raise ConfigError(f"invalid {what}: {one_line(exc, limit=None)}") from exc


def to_dict(cfg: Any) -> dict:
    """Plain, resolved ``dict`` of a config (for hashing, JSON and checkpoints)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if isinstance(cfg, dict):
        return cfg
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
