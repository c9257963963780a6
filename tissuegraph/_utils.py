"""Small helpers shared by all layers (standard library only)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A failure (or an interrupt) leaves no partial file at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # mkstemp creates 0600; give the file the usual umask-based mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def stable_hash(obj, n: int = 16) -> str:
    """Hash of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def file_hash(path: str | os.PathLike, n: int = 16, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:n]


def progress_bar(*args, **kwargs):
    """A tqdm progress bar; when stderr is not a terminal (a job log, CI) it redraws at most
    every 30 s instead of filling the log with updates."""
    import sys

    from tqdm.auto import tqdm

    stream = kwargs.get("file") or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        kwargs["mininterval"] = max(float(kwargs.get("mininterval") or 0.1), 30.0)
    return tqdm(*args, **kwargs)


def resolve_device(device=None, local_rank: int | None = None):
    """A ``torch.device``: ``"auto"`` (or ``None``) is CUDA when available, else the CPU.

    With ``local_rank`` (a distributed process), ``"auto"`` and an index-less ``"cuda"`` are
    ``cuda:LOCAL_RANK``. The one place that asks whether CUDA is there.
    """
    import torch

    if device in (None, "auto"):
        if not cuda_available():
            return torch.device("cpu")
        return torch.device("cuda" if local_rank is None else f"cuda:{local_rank}")
    dev = torch.device(device)
    if local_rank is not None and dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def cuda_available() -> bool:
    """Whether CUDA can be used."""
    import torch

    return torch.cuda.is_available()


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask: what ``taskset``, cgroups or a SLURM
    allocation leave it), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def torch_threads(requested: int = 0) -> int:
    """Intra-op threads torch should use in this process.

    ``requested > 0`` is used as given. Otherwise (auto) the CPUs of the affinity mask are
    shared among the processes of this machine: divided by ``LOCAL_WORLD_SIZE`` (set by
    ``torchrun``), so that ranks on one machine never oversubscribe it. Outside ``torchrun``
    an ``OMP_NUM_THREADS`` set in the environment caps the count (``torchrun`` sets it to 1
    for every multi-rank launch, so there it is not taken as the user's choice).
    """
    if requested and int(requested) > 0:
        return int(requested)
    local = os.environ.get("LOCAL_WORLD_SIZE")
    try:
        n_local = max(1, int(local)) if local else 1
    except ValueError:
        n_local = 1
    n = max(1, cpu_count() // n_local)
    if not local:
        try:
            omp = int(os.environ.get("OMP_NUM_THREADS", "0"))
        except ValueError:
            omp = 0
        if omp > 0:
            n = min(n, omp)
    return n


#: glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_TUNED = False


def tune_malloc(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Keep freed CPU tensor memory in the process heap (glibc only; once per process).

    glibc serves blocks above its mmap threshold (128 KiB to 32 MiB, adaptive) with a fresh
    ``mmap`` and returns them with ``munmap``, so every step's megabyte-sized activations
    cost system calls and page faults: on a DLPFC section this was about half of a CPU
    training step. Raising the thresholds (as ``MALLOC_MMAP_THRESHOLD_`` /
    ``MALLOC_TRIM_THRESHOLD_`` would) lets the heap reuse them. Set the environment variable
    ``TISSUEGRAPH_MALLOC=default`` to leave the allocator alone. Returns whether it applied.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if os.environ.get("TISSUEGRAPH_MALLOC", "").lower() == "default":
        return False
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    _MALLOC_TUNED = ok
    return ok


def set_torch_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads to :func:`torch_threads` and return the count (and
    :func:`tune_malloc` the CPU allocator)."""
    import torch

    tune_malloc()

    n = torch_threads(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def lazy_attributes(module: str, lazy: dict[str, str], namespace: dict):
    """A package's ``__getattr__``: the names in ``lazy`` (name -> defining module) are imported
    on first use and cached in ``namespace`` (the package's ``globals()``); any other name is
    tried as a submodule (``tissuegraph.nn.gnn`` after ``import tissuegraph.nn``)."""
    import importlib

    def __getattr__(name: str):
        if name in lazy:
            value = getattr(importlib.import_module(lazy[name]), name)
            namespace[name] = value
            return value
        if name.startswith("__"):
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        try:
            return importlib.import_module(f"{module}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{module}.{name}":
                raise
            raise AttributeError(f"module {module!r} has no attribute {name!r}") from None

    return __getattr__


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` where the C library has none."""
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except (OSError, AttributeError):
        return None


def release_heap() -> None:
    """Hand freed heap pages back to the system (glibc ``malloc_trim(0)``; a no-op elsewhere).

    glibc keeps freed blocks in its arenas: slides opened and dropped by the on-demand
    dataset left about 300 MB of freed heap resident after two refills of a 64-slide cache,
    with nothing live. The trainer calls this every few steps and the slide cache when it
    drops slides; about 5 ms a call on a fragmented heap.
    """
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


#: oneDNN primitives kept per process (its default: 1,024)
ONEDNN_CACHE = 32


def bound_onednn_cache(capacity: int = ONEDNN_CACHE) -> None:
    """Bound oneDNN's primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) unless set already.

    Tiles of varying size give CPU kernels a new shape nearly every step, and oneDNN keeps
    a compiled primitive, with its buffers, per shape: with its default capacity (1,024) the
    resident size of CPU pretraining grew by about 200 MB over 600 steps, with no speed
    gained. oneDNN reads the variable when it first builds a primitive, so this takes effect
    only before the process's first oneDNN operation (the trainer calls it before it builds
    its model; a ``tissuegraph pretrain`` process starts clean).
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(int(capacity)))
