"""Shared helpers of the tissuegraph benchmarks: timing, peak memory, results JSON, tables.

Every benchmark writes one JSON file to ``benchmarks/results/`` with this layout, which
``benchmarks/report.py`` turns into the README tables::

    {
      "benchmark": "domains_dlpfc",          # script name
      "title": "...",                        # one line
      "mode": "full" | "quick",
      "date": "2026-11-23T12:00:00+00:00",   # UTC, when the run finished
      "command": "uv run --group bench python benchmarks/domains_dlpfc.py --quick",
      "machine": {...},                      # CPU, cores, memory, torch threads, versions
      "params": {...},                       # everything that changes the numbers
      "runs": [{...}, ...],                  # one record per method x section x seed x ...
      "table": {"columns": [...], "rows": [[...], ...]},   # the summary printed
      "targets": [{"name", "value", "target", "op", "met", "unit", "context"}],
      "notes": ["..."]
    }

Memory is measured two ways, because neither alone is honest for a mixed Python / NumPy /
PyTorch workload:

- ``peak_rss_mb``: the largest resident set size of the process while the measured call ran
  (sampled every 20 ms by a thread, plus ``ru_maxrss`` when it rises during the call), and
  ``added_rss_mb`` = that peak minus the RSS when the call started. RSS counts PyTorch's and
  NumPy's buffers, but a process never gives all freed memory back, so a later stage in the
  same process may show less than it would alone: use one subprocess per stage or size
  (as ``scale.py`` does) where it matters.
- ``py_heap_peak_mb`` (optional, ``tracemalloc``): the peak of memory allocated through
  Python's allocators during the call, which includes NumPy arrays but not PyTorch tensors.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

__all__ = [
    "BENCH_DIR",
    "RESULTS_DIR",
    "ROOT",
    "Measurement",
    "Target",
    "command_line",
    "data_dir",
    "fmt_mean_sd",
    "loglog_slope",
    "machine_info",
    "markdown_table",
    "mean_sd",
    "measure",
    "results_path",
    "rss_mb",
    "set_threads",
    "write_results",
]


# ----------------------------------------------------------------------------- environment
def set_threads(n: int | None) -> None:
    """Limit BLAS / OpenMP / PyTorch threads (``None`` leaves the defaults)."""
    if not n:
        return
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    try:
        import torch

        torch.set_num_threads(int(n))
    except Exception:  # pragma: no cover - torch always present in this project
        pass


def data_dir() -> Path:
    """The real-data folder: ``$TISSUEGRAPH_DATA``, else ``../shared/data`` beside the project."""
    try:
        from tissuegraph.datasets import data_dir as _dd

        return Path(_dd())
    except Exception:
        pass
    env = os.environ.get("TISSUEGRAPH_DATA")
    for cand in [Path(env)] if env else []:
        if cand.is_dir():
            return cand
    cand = ROOT.parent / "shared" / "data"
    if cand.is_dir():
        return cand
    raise SystemExit(
        "real data not found: set TISSUEGRAPH_DATA to the folder holding dlpfc/ and her2st/"
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured: CPU, cores, memory, threads, GPU, package versions."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "memory_gb": _total_memory_gb(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "git_commit": _git_commit(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover
        info["gpu"] = None
    info["versions"] = {
        m: _version(m)
        for m in (
            "tissuegraph",
            "torch",
            "torch-geometric",
            "timm",
            "numpy",
            "scikit-learn",
            "scanpy",
            "squidpy",
            "anndata",
        )
    }
    return info


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, as typed from the project root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]) if argv else Path("?")
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(ROOT)
    return "uv run --group bench python " + " ".join(
        shlex.quote(a) for a in [str(script), *argv[1:]]
    )


# ----------------------------------------------------------------------------- measurement
def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux ``/proc``; ``ru_maxrss`` else)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        return _maxrss_mb()


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


@dataclass
class Measurement:
    """Wall time and memory of one measured call (see the module docstring)."""

    seconds: float = float("nan")
    peak_rss_mb: float = float("nan")
    added_rss_mb: float = float("nan")
    start_rss_mb: float = float("nan")
    py_heap_peak_mb: float | None = None

    def as_dict(self, prefix: str = "") -> dict[str, float | None]:
        return {f"{prefix}{k}": _round(v) for k, v in asdict(self).items()}


def _round(v, nd: int = 4):
    if isinstance(v, float):
        if not math.isfinite(v):
            return None
        return round(v, nd)
    return v


class _RssSampler:
    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


@contextlib.contextmanager
def measure(trace_python: bool = False) -> Iterator[Measurement]:
    """Measure the wall time and peak memory of the ``with`` block.

    Parameters
    ----------
    trace_python
        Also record the ``tracemalloc`` peak (Python + NumPy allocations). It slows
        allocation-heavy Python code, so timings taken with it are upper bounds.

    Yields
    ------
    A :class:`Measurement`, filled in when the block exits (also on error).

    Examples
    --------
    >>> with measure() as m:
    ...     x = np.ones((1000, 1000))
    >>> m.seconds >= 0
    True
    """
    m = Measurement()
    m.start_rss_mb = rss_mb()
    maxrss_before = _maxrss_mb()
    started_trace = False
    if trace_python and not tracemalloc.is_tracing():
        tracemalloc.start()
        started_trace = True
    if trace_python:
        tracemalloc.reset_peak()
    sampler = _RssSampler()
    t0 = time.perf_counter()
    try:
        with sampler:
            yield m
    finally:
        m.seconds = time.perf_counter() - t0
        peak = sampler.peak
        maxrss_after = _maxrss_mb()
        if maxrss_after > maxrss_before:  # a new process-wide peak was reached in the block
            peak = max(peak, maxrss_after)
        m.peak_rss_mb = peak
        m.added_rss_mb = max(0.0, peak - m.start_rss_mb)
        if trace_python:
            m.py_heap_peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
            if started_trace:
                tracemalloc.stop()


# ----------------------------------------------------------------------------- statistics
def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) of finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt_mean_sd(values: Sequence[float], nd: int = 3) -> str:
    m, s = mean_sd(values)
    if not np.isfinite(m):
        return "n/a"
    return f"{m:.{nd}f} ± {s:.{nd}f}" if len(values) > 1 else f"{m:.{nd}f}"


def loglog_slope(sizes: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of ``log(value)`` against ``log(size)`` (1 = linear growth)."""
    pts = [
        (math.log(s), math.log(v))
        for s, v in zip(sizes, values)
        if s and v and s > 0 and v > 0 and math.isfinite(v)
    ]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


# ----------------------------------------------------------------------------- targets / output
@dataclass
class Target:
    """A stated target next to the measured value: ``value op target`` -> ``met``."""

    name: str
    value: float | None
    target: float
    op: str = ">="
    unit: str = ""
    context: str = ""
    met: bool | None = field(default=None)

    def __post_init__(self) -> None:
        if self.value is None or not np.isfinite(self.value):
            self.value, self.met = None, None
        else:
            self.value = float(self.value)
            self.met = bool(
                self.value >= self.target if self.op == ">=" else self.value <= self.target
            )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["value"] = _round(d["value"])
        return d


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (floats with 4 significant digits, none after the point from 1,000)."""

    def cell(v) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            if not math.isfinite(v):
                return "n/a"
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def results_path(name: str, quick: bool, out: str | os.PathLike | None = None) -> Path:
    """``benchmarks/results/<name>.json`` (``<name>_quick.json`` for ``--quick``) or ``out``."""
    if out:
        return Path(out)
    return RESULTS_DIR / (f"{name}_quick.json" if quick else f"{name}.json")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return _round(float(obj), 6)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Target):
        return obj.as_dict()
    return obj


def write_results(
    path: str | os.PathLike,
    *,
    benchmark: str,
    title: str,
    quick: bool,
    params: dict[str, Any],
    runs: list[dict[str, Any]],
    table: tuple[Sequence[str], Sequence[Sequence[Any]]] | None = None,
    targets: Sequence[Target] = (),
    notes: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    argv: Sequence[str] | None = None,
) -> Path:
    """Write the results JSON atomically (see the module docstring for the layout)."""
    from tissuegraph._utils import write_json_atomic

    doc: dict[str, Any] = {
        "benchmark": benchmark,
        "title": title,
        "mode": "quick" if quick else "full",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(argv),
        "machine": machine_info(),
        "params": params,
        "runs": runs,
        "table": {"columns": list(table[0]), "rows": [list(r) for r in table[1]]}
        if table
        else None,
        "targets": [t.as_dict() if isinstance(t, Target) else t for t in targets],
        "notes": list(notes),
    }
    if extra:
        doc.update(extra)
    path = Path(path)
    write_json_atomic(path, _jsonable(doc))
    return path


def finish(
    path: str | os.PathLike,
    *,
    title: str,
    runs: list[dict[str, Any]],
    table: tuple[Sequence[str], Sequence[Sequence[Any]]],
    targets: Sequence[Target] = (),
    notes: Sequence[str] = (),
    **write_kw,
) -> dict[str, Any]:
    """The end of a benchmark's ``main``: :func:`write_results`, :func:`print_summary`, the
    path printed; returns ``{"path", "runs", "targets"}``."""
    out = write_results(
        path, title=title, runs=runs, table=table, targets=targets, notes=notes, **write_kw
    )
    print_summary(title, table[0], table[1], targets, notes)
    print(f"\nwrote {out}")
    return {"path": out, "runs": runs, "targets": targets}


def print_summary(title: str, columns, rows, targets: Sequence[Target] = (), notes=()) -> None:
    """Print the summary table, the targets and the notes to stdout."""
    print(f"\n## {title}\n")
    print(markdown_table(columns, rows))
    if targets:
        print()
        for t in targets:
            v = "n/a" if t.value is None else f"{t.value:.3f}"
            status = "not measured" if t.met is None else ("met" if t.met else "missed")
            print(f"- {t.name}: {v} (target {t.op} {t.target:g}{t.unit}): {status}")
    for n in notes:
        print(f"- note: {n}")
    sys.stdout.flush()


def load_json(path: str | os.PathLike) -> dict:
    with open(path) as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------- tissuegraph steps
def ensure_data_env() -> Path:
    """Point ``$TISSUEGRAPH_DATA`` at the data folder (for ``tissuegraph.datasets``)."""
    path = data_dir()
    os.environ.setdefault("TISSUEGRAPH_DATA", str(path))
    return path


def build_graph_dir(
    slides: Sequence[Any],
    out_dir: str | os.PathLike,
    *,
    n_top: int | None,
    fit_slides: Sequence[str] | None = None,
    panel_mode: str = "hvg",
    patches: bool | None = True,
    overrides: Sequence[str] = (),
    force: bool = False,
    config: str | os.PathLike | None = None,
) -> dict:
    """``tissuegraph.graph.pipeline.build_graphs`` on ``slides`` (``SlideSpec``s) into ``out_dir``.

    ``config``: a build YAML whose options are used (its slides are replaced by ``slides``).
    The gene panel is chosen on ``fit_slides`` only (default: all ``slides``); ``patches``
    ``None`` keeps the config's choice. Returns the manifest.
    """
    from omegaconf import OmegaConf

    from tissuegraph.config import load_config
    from tissuegraph.graph.config import BuildConfig
    from tissuegraph.graph.pipeline import build_graphs

    cfg = load_config(BuildConfig, config, list(overrides))
    cfg.slides = [OmegaConf.structured(s) for s in slides]
    cfg.out_dir = str(out_dir)
    cfg.panel.mode = panel_mode
    if n_top is not None:
        cfg.panel.n_top = int(n_top)
    cfg.panel.fit_slides = list(fit_slides) if fit_slides is not None else None
    if patches is not None:
        cfg.patches.enabled = bool(patches)
    return build_graphs(cfg, force=force, progress=False)


def check_training_slides(
    graphs_dir: str | os.PathLike, train: Sequence[str], heldout: Sequence[str]
) -> dict:
    """Leakage guard: the graphs used for pretraining hold exactly the ``train`` slides.

    Raises ``RuntimeError`` when a held-out slide is in the manifest, when a training slide
    is missing, or when the gene panel was fitted on anything but training slides.
    Returns the manifest.
    """
    from tissuegraph.graph.storage import read_manifest

    manifest = read_manifest(graphs_dir)
    names = [s["name"] for s in manifest["slides"]]
    leaked = sorted(set(names) & set(heldout))
    if leaked:
        raise RuntimeError(f"leakage: held-out slide(s) {leaked} are in the pretraining graphs")
    if sorted(names) != sorted(train):
        raise RuntimeError(f"pretraining graphs hold {names}, expected exactly {sorted(train)}")
    fit = ((manifest.get("build_config") or {}).get("panel") or {}).get("fit_slides")
    if fit is not None and set(fit) - set(train):
        raise RuntimeError(f"leakage: gene panel fitted on {fit}, not only on {sorted(train)}")
    return manifest


def pretrain_checkpoint(
    graphs_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    steps: int | None,
    seed: int = 0,
    device: str = "cpu",
    overrides: Sequence[str] = (),
    config: str | os.PathLike | None = None,
) -> Path:
    """Pretrain on ``graphs_dir``; returns the checkpoint path.

    ``config``: a pretrain YAML (the shipped recipe), used as it is when ``steps`` is
    ``None``. With ``steps``, the run is that long and its learning-rate warm-up 10% of it (at
    most 100 steps). TensorBoard logging is off. ``overrides`` win over all of these.
    """
    from tissuegraph.config import load_config
    from tissuegraph.train.config import PretrainConfig
    from tissuegraph.train.loop import pretrain

    base = [
        f"graphs={graphs_dir}",
        f"run_dir={run_dir}",
        f"seed={int(seed)}",
        f"train.device={device}",
        "train.tensorboard=false",
    ]
    if steps is not None:
        # short benchmark runs: warm up over 10% of the steps (library default: 100 steps)
        base += [
            f"train.max_steps={int(steps)}",
            f"train.warmup_steps={max(1, min(100, int(steps) // 10))}",
        ]
    cfg = load_config(PretrainConfig, config, base + list(overrides))
    out = pretrain(cfg, resume=False, progress=False)
    ckpt = Path(out)
    if ckpt.is_dir():
        ckpt = ckpt / "checkpoints" / "last.pt"
    return ckpt
