"""Pretraining across a corpus: sharded build and on-demand pretraining of 20 to 1,000 slides.

For each corpus size (20, 200, 1,000 slides of 2,000 spots, ``--quick``: 20 and 200):

``simulate``  the slides written as ``.h5ad`` (raw counts, no image; not a tissuegraph cost):
              ``--n-base`` slides from ``tissuegraph.datasets.simulate_slide``, every corpus
              slide a Poisson resampling of one of them with its own seed
``build``     ``tissuegraph build-graphs --shard i/2`` in 2 concurrent processes, then
              ``--merge`` (wall time of both phases; panel on the first 4 slides, no patches)
``pretrain``  ``tissuegraph.train.pretrain`` for ``--steps`` steps in its own subprocess (peak
              RSS clean: that process's ``ru_maxrss``), on CPU with 1 thread, the library
              default ``train.max_cached_slides`` (64): the 20-slide corpus is loaded whole,
              the larger ones are opened on demand

Spots/s is the mean of the logged rate over the steps after the first logging interval (the
first holds start-up); ``pretrain s`` is the whole call, start-up and slide loading included.
Targets: peak RSS of the largest corpus <= 1.3x the 20-slide corpus's, spots/s within 20%.

Run ``uv run python benchmarks/corpus.py [--quick] [--sizes 20 200 1000] [--steps 600]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ROOT,
    Target,
    _maxrss_mb,
    print_summary,
    results_path,
    set_threads,
    write_results,
)

NAME = "corpus"
TITLE = "Pretraining across a corpus (sharded build, graphs opened on demand)"
FULL_SIZES = (20, 200, 1000)
QUICK_SIZES = (20, 200)
N_SHARDS = 2
RSS_RATIO_MAX = 1.3
RATE_RATIO_MIN = 0.8


# ----------------------------------------------------------------------------- slides
def simulate_corpus(n: int, folder: Path, *, n_spots: int, n_genes: int, n_base: int) -> None:
    """``n`` slides ``c00000.h5ad``...: Poisson resamplings of ``n_base`` simulated slides."""
    import numpy as np
    import scipy.sparse as sp

    from tissuegraph.datasets import simulate_slide

    folder.mkdir(parents=True, exist_ok=True)
    bases = []
    for b in range(min(n_base, n)):
        a = simulate_slide(n_spots, n_genes=n_genes, image=False, seed=b)
        for k in [k for k in a.obsm if k.startswith("true_")]:
            del a.obsm[k]
        a.uns.pop("simulation", None)
        bases.append(a)
    for i in range(n):
        a = bases[i % len(bases)].copy()
        rng = np.random.default_rng([11, i])
        x = a.X.tocsr() if sp.issparse(a.X) else sp.csr_matrix(a.X)
        x.data = rng.poisson(x.data * rng.uniform(0.8, 1.2)).astype(np.float32)
        x.eliminate_zeros()
        a.X = x
        a.write_h5ad(folder / f"c{i:05d}.h5ad")


def _build_config(n: int, slides: Path, out: Path, n_top: int) -> Path:
    lines = [f"out_dir: {out}", "slides:"]
    lines += [
        f"  - {{name: c{i:05d}, format: h5ad, path: {slides / f'c{i:05d}.h5ad'}}}" for i in range(n)
    ]
    fit = ", ".join(f"c{i:05d}" for i in range(min(4, n)))
    lines += [f"panel: {{n_top: {n_top}, fit_slides: [{fit}]}}", "patches: {enabled: false}"]
    cfg = out.parent / f"build_{n}.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tissuegraph", *args]


def build_sharded(cfg: Path, log: Path) -> dict:
    """``build-graphs --shard i/2`` in 2 concurrent processes, then ``--merge``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    procs = []
    for i in range(N_SHARDS):
        fh = open(log.with_suffix(f".shard{i}.log"), "w")
        procs.append(
            (
                subprocess.Popen(
                    _cli("build-graphs", "--config", str(cfg), "--shard", f"{i}/{N_SHARDS}", "-q"),
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=ROOT,
                ),
                fh,
            )
        )
    codes = []
    for p, fh in procs:
        codes.append(p.wait())
        fh.close()
    t_shards = time.perf_counter() - t0
    if any(codes):
        raise RuntimeError(f"a build shard failed: see {log.parent}")
    t1 = time.perf_counter()
    res = subprocess.run(
        _cli("build-graphs", "--config", str(cfg), "--merge", "-q"),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if res.returncode:
        raise RuntimeError(f"merge failed: {res.stderr.strip()}")
    return {
        "shards_s": t_shards,
        "merge_s": time.perf_counter() - t1,
        "build_s": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- pretrain worker
def pretrain_worker(graphs: Path, run_dir: Path, out: Path, steps: int, overrides: list[str]):
    """Pretrain in this process; write rate, time and peak RSS to ``out``."""
    import tissuegraph.train.loop  # noqa: F401 - import time is no pretraining cost
    from tissuegraph.config import load_config
    from tissuegraph.train.config import PretrainConfig
    from tissuegraph.train.loop import Trainer

    rss_start = _maxrss_mb()
    cfg = load_config(
        PretrainConfig,
        None,
        [
            f"graphs={graphs}",
            f"run_dir={run_dir}",
            "train.device=cpu",
            "train.threads=1",
            f"train.max_steps={steps}",
            f"train.warmup_steps={max(1, steps // 10)}",
            "train.log_every=10",
            "train.eval_every=0",
            "train.ckpt_every=0",
            "train.ckpt_every_min=0",
            "train.tensorboard=false",
            *overrides,
        ],
    )
    t0 = time.perf_counter()
    tr = Trainer(cfg, progress=False)
    t_setup = time.perf_counter() - t0
    tr.fit()
    total = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["spots_per_s"] for r in rows[1:]] or [r["spots_per_s"] for r in rows]
    rec = {
        "steps": steps,
        "lazy": bool(tr.lazy),
        "max_cached_slides": int(cfg.train.max_cached_slides),
        "batch_spots": int(cfg.train.batch_spots),
        "setup_s": t_setup,
        "pretrain_s": total,
        "spots_per_s": sum(rates) / len(rates),
        "spots_per_s_rows": rates,
        "slides_opened": int(tr.dataset.loads) if tr.lazy else len(tr.slide_names),
        "rss_after_import_mb": rss_start,
        "peak_rss_mb": _maxrss_mb(),
        "final_loss": rows[-1]["loss"],
    }
    out.write_text(json.dumps(rec, indent=1))


def pretrain_subprocess(graphs: Path, run_dir: Path, steps: int, a) -> dict:
    part = run_dir.parent / f"pretrain_{run_dir.name}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        str(graphs),
        "--run-dir",
        str(run_dir),
        "--part",
        str(part),
        "--steps",
        str(steps),
    ]
    for o in a.override:
        cmd += ["--override", o]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    if res.returncode or not part.exists():
        raise RuntimeError(f"pretrain failed: {(res.stdout + res.stderr)[-2000:]}")
    rec = json.loads(part.read_text())
    ru = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rec["children_maxrss_mb"] = ru  # the largest child so far (a cross-check)
    return rec


# ----------------------------------------------------------------------------- parent
def chunk_note(steps: int, batch: int, n_spots: int, chunk: int) -> str:
    """What the pretraining steps of a corpus larger than the slide cache read."""
    n = -(-steps * batch // (chunk * n_spots))  # chunks of ``chunk`` slides the steps reach
    head = (
        f"train.max_cached_slides={chunk} (default): corpora of more slides are opened on "
        f"demand, {chunk} at a time; {steps} steps of {batch} spots reach about "
    )
    if n <= 1:
        return head + (
            f"only the first chunk of {chunk} slides, so their loading is in the first logging "
            "interval and in 'pretrain s', not in spots/s"
        )
    return head + (
        f"{n} chunks of {chunk} slides: the cache is emptied and refilled {n - 1} time(s), "
        "and that loading is inside spots/s and the peak RSS"
    )


def run_size(n: int, a, workdir: Path) -> dict:
    wd = workdir / str(n)
    wd.mkdir(parents=True, exist_ok=True)
    rec: dict = {"n_slides": n, "n_spots_per_slide": a.n_spots, "status": "running"}
    try:
        t0 = time.perf_counter()
        simulate_corpus(n, wd / "slides", n_spots=a.n_spots, n_genes=a.n_genes, n_base=a.n_base)
        rec["simulate_s"] = time.perf_counter() - t0
        cfg = _build_config(n, wd / "slides", wd / "graphs", a.n_top)
        rec.update(build_sharded(cfg, wd / "build.log"))
        shutil.rmtree(wd / "slides")  # the inputs are no longer needed: keep the disk small
        rec["graphs_mb"] = sum(p.stat().st_size for p in (wd / "graphs").glob("*.pt")) / 2**20
        rec.update(pretrain_subprocess(wd / "graphs", wd / "run", a.steps, a))
        rec["status"] = "ok"
    except Exception as exc:  # record what ran
        rec["status"] = "failed"
        rec["error"] = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    print(
        f"  {n} slides: {rec['status']} build {rec.get('build_s', float('nan')):.0f}s, "
        f"{rec.get('spots_per_s', float('nan')):.0f} spots/s, "
        f"peak RSS {rec.get('peak_rss_mb', float('nan')):.0f} MB",
        flush=True,
    )
    return rec


def summarise(runs: list[dict]):
    cols = [
        "slides",
        "spots",
        "build s (2 shards + merge)",
        "graphs MB",
        "pretrain s",
        "spots/s",
        "slides opened",
        "peak RSS MB",
    ]
    rows = [
        [
            r["n_slides"],
            f"{r['n_slides'] * r['n_spots_per_slide']:,}",
            round(r["build_s"], 1) if "build_s" in r else None,
            round(r["graphs_mb"]) if "graphs_mb" in r else None,
            round(r["pretrain_s"], 1) if "pretrain_s" in r else None,
            round(r["spots_per_s"]) if "spots_per_s" in r else None,
            r.get("slides_opened"),
            round(r["peak_rss_mb"]) if "peak_rss_mb" in r else None,
        ]
        for r in runs
    ]
    ok = [r for r in runs if r["status"] == "ok"]
    targets = []
    if len(ok) >= 2:
        small, big = ok[0], ok[-1]
        ctx = f"{big['n_slides']} vs {small['n_slides']} slides"
        targets.append(
            Target(
                "peak RSS ratio (largest / smallest corpus)",
                big["peak_rss_mb"] / small["peak_rss_mb"],
                RSS_RATIO_MAX,
                op="<=",
                unit="x",
                context=ctx,
            )
        )
        targets.append(
            Target(
                "spots/s ratio (largest / smallest corpus)",
                big["spots_per_s"] / small["spots_per_s"],
                RATE_RATIO_MIN,
                op=">=",
                unit="x",
                context=ctx,
            )
        )
    return cols, rows, targets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="20 and 200 slides")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument(
        "--steps",
        type=int,
        default=600,
        help="pretraining steps; 600 of 512 spots cross 3 chunks of 64 slides (the cache refills)",
    )
    p.add_argument("--n-spots", type=int, default=2000)
    p.add_argument("--n-genes", type=int, default=300, help="genes simulated per slide")
    p.add_argument("--n-top", type=int, default=200, help="panel size (hvg)")
    p.add_argument("--n-base", type=int, default=20, help="distinct simulated slides")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per pretraining run")
    p.add_argument("--override", action="append", default=[], help="pretrain override KEY=VALUE")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    set_threads(1)
    if a.worker is not None:
        pretrain_worker(Path(a.worker), Path(a.run_dir), Path(a.part), a.steps, a.override)
        return None
    sizes = a.sizes or list(QUICK_SIZES if a.quick else FULL_SIZES)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tg_bench_corpus_", dir=a.workdir) as tmp:
        runs = [run_size(n, a, Path(tmp)) for n in sizes]
    cols, rows, targets = summarise(runs)
    notes = [
        "one pretraining subprocess per corpus size: peak RSS is that process's ru_maxrss "
        "(imports, model, slide cache and all)",
        "the slides have no image: pretraining runs the masked-expression objective only",
        chunk_note(a.steps, 512, a.n_spots, 64),
        "build: 2 local processes (--shard 0/2, 1/2) then --merge; the 2-core machine was "
        "shared with other jobs, so times are indicative",
    ]
    failed = [r for r in runs if r["status"] != "ok"]
    notes += [f"{r['n_slides']} slides: {r['status']}: {r.get('error')}" for r in failed]
    path = write_results(
        results_path(NAME, a.quick, a.out),
        benchmark=NAME,
        title=TITLE,
        quick=a.quick,
        params={
            "sizes": sizes,
            "steps": a.steps,
            "n_spots": a.n_spots,
            "n_genes": a.n_top,
            "n_base": a.n_base,
            "shards": N_SHARDS,
            "batch_spots": 512,
            "device": "cpu",
            "threads": 1,
            "overrides": a.override,
            "elapsed_s": time.perf_counter() - t0,
        },
        runs=runs,
        table=(cols, rows),
        targets=targets,
        notes=notes,
    )
    print_summary(TITLE, cols, rows, targets, notes)
    print(f"\nwrote {path}")
    return {"path": path, "runs": runs}


if __name__ == "__main__":
    main()
