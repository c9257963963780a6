"""Graph files and the build manifest.

Graphs are written with ``torch.save`` (atomically) and read with
``torch.load(weights_only=True)``: only tensors, plain containers and the few PyG classes
that make up a ``HeteroData`` are unpickled, so a graph file cannot run code on load.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch_geometric.data import HeteroData
from torch_geometric.data.storage import BaseStorage, EdgeStorage, NodeStorage

from tissuegraph._utils import atomic_path, write_text_atomic
from tissuegraph.errors import InputError
from tissuegraph.graph import schema

__all__ = [
    "SAFE_GLOBALS",
    "save_graph",
    "load_graph",
    "read_manifest",
    "write_manifest",
    "write_resolved_config",
    "safe_load",
]

#: The classes a graph file may contain besides tensors and plain Python containers.
SAFE_GLOBALS = [HeteroData, BaseStorage, NodeStorage, EdgeStorage]
torch.serialization.add_safe_globals(SAFE_GLOBALS)


def save_graph(data: HeteroData, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` (``.pt``) atomically; returns the path.

    The same graph always gives the same bytes (the archive is written through a file
    object, so its inner folder name does not depend on the temporary file's name)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(data, fh)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # temp files are created 0600
    return path


def _refusal(path: Path, exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, in our own words."""
    text = str(exc)
    size = path.stat().st_size if path.is_file() else 0
    if size == 0:
        return "the file is empty"
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return (
            f"it would load the Python object {m.group(1)}, refused by the safe loader "
            "(a file like this can run code when opened)"
        )
    if isinstance(exc, (EOFError, zipfile.BadZipFile)) or "zip archive" in text:
        return f"the file ({size:,} bytes) is truncated or damaged"
    if isinstance(exc, pickle.UnpicklingError) or "load key" in text:
        return f"the file ({size:,} bytes) is not in PyTorch's format"
    return f"the safe loader could not read it ({type(exc).__name__})"


def safe_load(path: str | os.PathLike, what: str, *, map_location="cpu", mmap: bool = False):
    """``torch.load(path, weights_only=True)``, failing with a one-line :class:`InputError`
    ``"<path>: not a tissuegraph <what>: <reason>"`` whose reason is ours, never a cut
    third-party message. ``what`` names the kind of file (``graph file``, ``checkpoint``).
    ``mmap``: map the tensors' storage from the file instead of reading it (pages are read
    when touched); a file in the legacy (non-zip) format is read whole instead."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        # (re-)register globally: the ``safe_globals`` context manager would remove the
        # classes again on exit, also for a plain ``torch.load`` elsewhere
        torch.serialization.add_safe_globals(SAFE_GLOBALS)
        if mmap and zipfile.is_zipfile(path):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: not a tissuegraph {what}: {_refusal(path, exc)}") from exc


def load_graph(path: str | os.PathLike, *, map_location="cpu", mmap: bool = False) -> HeteroData:
    """Read a graph written by :func:`save_graph` with ``torch.load(weights_only=True)``
    (``mmap``: memory-mapped, see :func:`safe_load`).

    Raises :class:`~tissuegraph.errors.InputError` for a missing file or a file that holds
    anything but a ``HeteroData`` (e.g. a pickle that would run code).
    """
    data = safe_load(path, "graph file", map_location=map_location, mmap=mmap)
    if not isinstance(data, HeteroData):
        raise InputError(
            f"{path}: not a tissuegraph graph file: it holds a {type(data).__name__}, "
            "not a HeteroData graph"
        )
    return data


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """The ``manifest.json`` of a build-graphs output folder."""
    p = Path(out_dir)
    if p.is_dir():
        p = p / schema.MANIFEST
    if not p.is_file():
        raise InputError(f"no {schema.MANIFEST} in {Path(out_dir)}: run tissuegraph build-graphs")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{p} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def _write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` atomically unless the file already holds exactly it (an
    up-to-date rebuild touches no file). Returns whether it wrote."""
    try:
        if path.is_file() and path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    write_text_atomic(path, text)
    return True


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> Path:
    """Write ``<out_dir>/manifest.json`` (atomically; only when its content changed)."""
    p = Path(out_dir) / schema.MANIFEST
    _write_if_changed(p, json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    return p


def write_resolved_config(out_dir: str | os.PathLike, cfg) -> Path:
    """Write the resolved build config to ``<out_dir>/config.yaml`` (atomically; only when
    its content changed)."""
    from omegaconf import OmegaConf

    from tissuegraph.config import to_dict

    p = Path(out_dir) / schema.RESOLVED_CONFIG
    _write_if_changed(p, OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
    return p
