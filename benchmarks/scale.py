"""Scaling: build, one training epoch in tiles, and embedding of synthetic slides of growing size.

Each size runs in its own subprocess so that its peak resident memory is measured alone
(``ru_maxrss`` of that process, plus the peak sampled during each stage). Stages:

``simulate``   ``tissuegraph.datasets.simulate_slide(n, image=False, n_genes=200)``
``write``      the slide written as ``.h5ad`` (input of the build; not a tissuegraph cost)
``build``      ``build_graphs`` (h5ad -> spot graph, expression, gene edges; no image)
``train``      ``pretrain`` for one epoch in spatial tiles: ``max_steps = ceil(n / batch_spots)``
``embed``      ``embed_graph`` over all spots, in tiles

A least-squares slope of log(time) and log(peak memory) against log(n) says how the cost
grows: 1 is linear. Sizes: 10k, 100k, 1M spots (``--quick``: 10k, 50k).

Run ``uv run python benchmarks/scale.py [--quick] [--sizes 10000 100000]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Target,
    _maxrss_mb,
    build_graph_dir,
    finish,
    loglog_slope,
    measure,
    pretrain_checkpoint,
    results_path,
    set_threads,
)

NAME = "scale"
TITLE = "Scaling with slide size (synthetic slides, 200 genes, no image)"
STAGES = ("simulate", "write", "build", "train", "embed")
COST_STAGES = ("build", "train", "embed")
FULL_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 50_000)
SLOPE_LINEAR_MAX = 1.15


# ----------------------------------------------------------------------------- worker
def worker(
    n: int, workdir: Path, out: Path, *, batch_spots: int, n_genes: int, overrides: list[str]
):
    """Run all stages for one size; rewrite ``out`` (JSON) after every stage."""
    # import everything first: module import time (~10 s for torch_geometric) is no stage's cost
    import tissuegraph.graph.pipeline  # noqa: F401
    import tissuegraph.graph.storage  # noqa: F401
    import tissuegraph.train.checkpoint  # noqa: F401
    import tissuegraph.train.infer  # noqa: F401
    import tissuegraph.train.loop  # noqa: F401
    from tissuegraph import io
    from tissuegraph.datasets import simulate_slide
    from tissuegraph.graph.config import SlideSpec

    rec: dict = {"n_spots": n, "stages": {}, "status": "running", "pid": os.getpid()}

    def save():
        rec["ru_maxrss_mb"] = _maxrss_mb()
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, out)

    def stage(name, m, **extra):
        rec["stages"][name] = {**m.as_dict(), **extra}
        print(f"    [{n:,}] {name}: {m.seconds:.1f}s, peak RSS {m.peak_rss_mb:.0f} MB", flush=True)
        save()

    save()
    with measure() as m:
        adata = simulate_slide(n, image=False, n_genes=n_genes, seed=0)
    stage("simulate", m)
    h5 = workdir / f"slide_{n}.h5ad"
    with measure() as m:
        io.write_h5ad(adata, h5)
    stage("write", m, bytes=h5.stat().st_size)
    del adata
    gc.collect()

    graphs = workdir / f"graphs_{n}"
    spec = SlideSpec(name=f"sim{n}", format="h5ad", path=str(h5))
    with measure() as m:
        manifest = build_graph_dir(
            [spec],
            graphs,
            n_top=n_genes,
            panel_mode="all",
            patches=False,
            overrides=[o for o in overrides if not o.startswith("train:")],
        )
    sl = manifest["slides"][0]
    stage("build", m, node_counts=sl.get("node_counts"), edge_counts=sl.get("edge_counts"))
    gc.collect()

    steps = max(1, math.ceil(n / batch_spots))
    with measure() as m:
        ckpt = pretrain_checkpoint(
            graphs,
            workdir / f"run_{n}",
            steps=steps,
            seed=0,
            device="cpu",
            overrides=[f"train.batch_spots={batch_spots}", *overrides_train(overrides)],
        )
    stage("train", m, steps=steps, batch_spots=batch_spots, s_per_step=m.seconds / steps)
    gc.collect()

    from tissuegraph.graph.storage import load_graph
    from tissuegraph.train.checkpoint import load
    from tissuegraph.train.infer import embed_graph

    with measure() as m:
        model = load(ckpt, device="cpu").model
        data = load_graph(graphs / sl["file"])
        emb = embed_graph(model, data, kind="expression", batch_spots=batch_spots, device="cpu")
    stage("embed", m, dim=int(emb.shape[1]))
    rec["status"] = "ok"
    save()


def overrides_train(overrides: list[str]) -> list[str]:
    """Pretraining overrides given as ``train:KEY=VALUE`` on the command line."""
    return [o.split(":", 1)[1] for o in overrides if o.startswith("train:")]


# ----------------------------------------------------------------------------- parent
def run_size(n: int, a, workdir: Path) -> dict:
    """Run :func:`worker` for size ``n`` in a subprocess (with a time limit)."""
    part = workdir / f"part_{n}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        str(n),
        "--workdir",
        str(workdir),
        "--part",
        str(part),
        "--batch-spots",
        str(a.batch_spots),
        "--n-genes",
        str(a.n_genes),
        "--threads",
        str(a.threads or 0),
    ]
    for o in a.override:
        cmd += ["--override", o]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=a.timeout, text=True, capture_output=True)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        tail = (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired as exc:
        status = f"timeout after {a.timeout}s"
        tail = (
            (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        )[-2000:]
    rec = json.loads(part.read_text()) if part.exists() else {"n_spots": n, "stages": {}}
    rec["status"] = status
    rec["wall_s"] = time.perf_counter() - t0
    if status != "ok":
        rec["log_tail"] = tail
        err = [ln for ln in tail.splitlines() if ln.strip()]
        rec["error"] = err[-1] if err else status
    print(f"  {n:,} spots: {status} ({rec['wall_s']:.0f}s)", flush=True)
    return rec


def summarise(runs: list[dict]):
    cols = ["spots", "status"]
    for st in COST_STAGES:
        cols += [f"{st} s", f"{st} peak RSS MB"]
    cols += ["process peak RSS MB"]
    rows = []
    for r in runs:
        row = [f"{r['n_spots']:,}", r["status"]]
        for st in COST_STAGES:
            s = r["stages"].get(st)
            row += [round(s["seconds"], 1) if s else None, round(s["peak_rss_mb"]) if s else None]
        row.append(round(r.get("ru_maxrss_mb", float("nan"))))
        rows.append(row)
    slopes: dict = {}
    for st in COST_STAGES:
        done = [r for r in runs if st in r["stages"]]
        sizes = [r["n_spots"] for r in done]
        slopes[st] = {
            "time": loglog_slope(sizes, [r["stages"][st]["seconds"] for r in done]),
            "peak_rss": loglog_slope(sizes, [r["stages"][st]["peak_rss_mb"] for r in done]),
            "added_rss": loglog_slope(sizes, [r["stages"][st]["added_rss_mb"] for r in done]),
            "sizes": sizes,
        }
    rows.append(
        ["log-log slope", ""]
        + sum(
            [
                [
                    _fmt(slopes[st]["time"]),
                    _fmt(slopes[st]["peak_rss"]),
                ]
                for st in COST_STAGES
            ],
            [],
        )
        + [""]
    )
    targets = [
        Target(
            f"{st} time log-log slope",
            slopes[st]["time"],
            SLOPE_LINEAR_MAX,
            op="<=",
            context=f"sizes {slopes[st]['sizes']}; 1 = linear",
        )
        for st in COST_STAGES
    ]
    largest = max(
        (r for r in runs if r["status"] == "ok"), key=lambda r: r["n_spots"], default=None
    )
    targets.append(
        Target(
            "largest slide built, trained one epoch and embedded (spots)",
            largest["n_spots"] if largest else None,
            1_000_000,
            context="DESIGN: a 1M-spot slide must build and train in tiles on one machine",
        )
    )
    return cols, rows, targets, slopes


def _fmt(v):
    return None if v is None else round(v, 2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="10k and 50k spots")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--batch-spots", type=int, default=4096, help="spots per training tile")
    p.add_argument("--n-genes", type=int, default=200)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per size")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="build override KEY=VALUE, or train:KEY=VALUE for pretraining",
    )
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    a = parse_args(argv)
    set_threads(a.threads)
    if a.worker is not None:
        worker(
            a.worker,
            Path(a.workdir),
            Path(a.part),
            batch_spots=a.batch_spots,
            n_genes=a.n_genes,
            overrides=list(a.override),
        )
        return None
    sizes = a.sizes or list(QUICK_SIZES if a.quick else FULL_SIZES)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tg_bench_scale_", dir=a.workdir) as tmp:
        runs = []
        for n in sizes:
            wd = Path(tmp) / str(n)
            wd.mkdir()
            runs.append(run_size(n, a, wd))
    cols, rows, targets, slopes = summarise(runs)
    notes = [
        "one subprocess per size: 'process peak RSS' is that process's ru_maxrss; stage peaks "
        "are sampled every 20 ms while the stage runs (the process's earlier data included)",
        "the slides have no image: embedding uses kind='expression' and pretraining runs only "
        "the masked-expression objective (the image terms have no patches to act on)",
    ]
    for st, sl in slopes.items():
        if sl["time"] is not None and sl["time"] > SLOPE_LINEAR_MAX:
            notes.append(f"{st}: time grows faster than linear (slope {sl['time']:.2f})")
    return finish(
        results_path(NAME, a.quick, a.out),
        benchmark=NAME,
        title=TITLE,
        quick=a.quick,
        params={
            "sizes": sizes,
            "batch_spots": a.batch_spots,
            "n_genes": a.n_genes,
            "timeout_s": a.timeout,
            "threads": a.threads,
            "overrides": a.override,
            "elapsed_s": time.perf_counter() - t0,
        },
        runs=runs,
        table=(cols, rows),
        targets=targets,
        notes=notes,
        extra={"slopes": slopes},
    )


if __name__ == "__main__":
    main()
