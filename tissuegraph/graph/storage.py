"""Graph files and the build manifest.

Graphs are written with ``torch.save`` (atomically) and read with
``torch.load(weights_only=True)``: only tensors, plain containers and the few PyG classes
that make up a ``HeteroData`` are unpickled, so a graph file cannot run code on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch_geometric.data import HeteroData
from torch_geometric.data.storage import BaseStorage, EdgeStorage, NodeStorage

from tissuegraph._utils import atomic_path, write_json_atomic
from tissuegraph.errors import InputError
from tissuegraph.graph import schema

__all__ = ["SAFE_GLOBALS", "save_graph", "load_graph", "read_manifest", "write_manifest"]

#: The classes a graph file may contain besides tensors and plain Python containers.
SAFE_GLOBALS = [HeteroData, BaseStorage, NodeStorage, EdgeStorage]
torch.serialization.add_safe_globals(SAFE_GLOBALS)


def save_graph(data: HeteroData, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` (``.pt``) atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # temp files are created 0600
    return path


def load_graph(path: str | os.PathLike, *, map_location="cpu") -> HeteroData:
    """Read a graph written by :func:`save_graph` with ``torch.load(weights_only=True)``.

    Raises :class:`~tissuegraph.errors.InputError` for a missing file or a file that holds
    anything but a ``HeteroData`` (e.g. a pickle that would run code).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"graph file not found: {path}")
    try:
        # (re-)register globally: the ``safe_globals`` context manager would remove the
        # classes again on exit, also for a plain ``torch.load`` elsewhere
        torch.serialization.add_safe_globals(SAFE_GLOBALS)
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        detail = next(
            (m for m in msg if "Unsupported" in m or "GLOBAL" in m), msg[0] if msg else ""
        )
        raise InputError(
            f"{path} is not a tissuegraph graph file (refused by the safe loader: "
            f"{detail.strip()[:200]})"
        ) from exc
    if not isinstance(data, HeteroData):
        raise InputError(f"{path} holds a {type(data).__name__}, not a HeteroData graph")
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


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> Path:
    p = Path(out_dir) / schema.MANIFEST
    write_json_atomic(p, manifest)
    return p
