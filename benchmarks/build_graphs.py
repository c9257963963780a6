"""Benchmark: graph building (tissuegraph) against squidpy doing the same steps.

    uv run --group bench python benchmarks/build_graphs.py [--quick] [--threads 1] [--out FILE]

Cases: DLPFC 151673 (Visium, lowres image), one HER2+ ST section (full-resolution JPEG), and
simulated slides of 100k and 1M spots without image (``--quick``: 20k). Every case x method
runs in its own subprocess so that its peak memory is its own.

Steps compared on the same AnnData:

- spot graph: ``tissuegraph.graph.spatial.spot_graph(method="grid")`` vs
  ``squidpy.gr.spatial_neighbors(coord_type="grid", n_neighs=6|4, n_rings=1)``, timed on the
  first call in a fresh process and as the median of 5 further calls ("warm");
- spot crops (image cases): ``SlideImage.crop`` of a ``patch_0`` (110 µm Visium, 200 µm ST)
  square around every spot resized to 32 px vs ``squidpy.im.ImageContainer`` +
  ``generate_spot_crops(spot_scale=..., scale=...)`` (crops of the same side, rescaled to
  about 32 px);
- full build (tissuegraph only): ``build_slide_graph`` with normalisation, panel, spot graph,
  top-32 ``expresses`` edges, all patch scales and assembly. The "full vs squidpy" ratio
  compares it with squidpy's graph + crops alone (squidpy does less).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Target,
    command_line,
    data_dir,
    measure,
    print_summary,
    results_path,
    set_threads,
    write_results,
)

CROP_PX = 32
TIMEOUT_S = 900
WARM_REPEATS = 5


# ----------------------------------------------------------------------------- worker side
def warm_median(fn, repeats: int = WARM_REPEATS) -> float:
    """Median wall time of ``repeats`` further calls of ``fn`` (after the measured first call:
    imports, lazy initialisation and first-touch page faults are paid by then)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(sorted(times)[len(times) // 2])


def _load(case: dict):
    from tissuegraph import io

    if case["kind"] == "visium":
        return io.read_visium(case["path"])
    if case["kind"] == "st":
        p = Path(case["path"])
        return io.read_st(p / "counts.tsv.gz", p / "spots.tsv", p / "he.jpg")
    return io.read_h5ad(case["path"])


def _tg_cfg(case: dict):
    from tissuegraph.graph.config import BuildConfig

    cfg = BuildConfig()
    cfg.patches.enabled = case["image"]
    cfg.patches.sizes_um = case["sizes_um"]
    cfg.patches.crop_px = CROP_PX
    cfg.spatial.method = "grid"
    cfg.spatial.rings = 1
    cfg.priors.expresses_top_k = 32
    return cfg


def run_tissuegraph(case: dict) -> dict:
    import numpy as np

    from tissuegraph import io
    from tissuegraph.graph.genes import select_hvg
    from tissuegraph.graph.patches import crop_patches
    from tissuegraph.graph.pipeline import _array_rc, _grid_kind, _positions_um, build_slide_graph
    from tissuegraph.graph.priors import PriorTables
    from tissuegraph.graph.spatial import spot_graph

    adata = _load(case)
    out = {"n_spots": int(adata.n_obs), "n_genes": int(adata.n_vars)}
    cfg = _tg_cfg(case)
    if case["n_top"]:
        genes = select_hvg({"s": (adata.X, list(adata.var_names))}, case["n_top"])
    else:
        genes = list(adata.var_names)
    pos = _positions_um(adata)
    rc = _array_rc(adata)
    grid = _grid_kind(adata, rc)
    with measure() as m:
        ei, _ = spot_graph(pos, method="grid", array_rc=rc, grid=grid, rings=1)
    out["spot_graph"] = m.as_dict()
    out["spot_graph_warm_s"] = warm_median(
        lambda: spot_graph(pos, method="grid", array_rc=rc, grid=grid, rings=1)
    )
    out["n_edges"] = int(ei.shape[1])
    if case["image"]:
        mpp = adata.uns["tissuegraph"]["microns_per_pixel"]
        with measure() as m:
            with io.open_image(adata) as img:
                crops = crop_patches(img, adata.obsm["spatial"], case["sizes_um"][0] / mpp, CROP_PX)
        out["crops"] = m.as_dict()
        out["crops_shape"] = list(crops.shape)
        del crops
    with measure() as m:
        data = build_slide_graph(
            adata, cfg, genes=genes, slide_name=case["name"], priors=PriorTables()
        )
    out["build"] = m.as_dict()
    out["edges"] = {"__".join(k): int(v.edge_index.shape[1]) for k, v in data.edge_items()}
    out["x_shape"] = list(data["spot"].x.shape)
    del data
    np.zeros(1)
    return out


def run_squidpy(case: dict) -> dict:
    import numpy as np
    import squidpy as sq

    adata = _load(case)
    out = {"n_spots": int(adata.n_obs)}
    grid = adata.uns["tissuegraph"].get("grid", "hex")
    n_neighs = 6 if grid == "hex" else 4
    with measure() as m:
        sq.gr.spatial_neighbors(adata, coord_type="grid", n_neighs=n_neighs, n_rings=1)
    out["spot_graph"] = m.as_dict()
    out["spot_graph_warm_s"] = warm_median(
        lambda: sq.gr.spatial_neighbors(adata, coord_type="grid", n_neighs=n_neighs, n_rings=1)
    )
    out["n_edges"] = int(adata.obsp["spatial_connectivities"].nnz)
    if case["image"]:
        lib = adata.uns["tissuegraph"]["library_id"]
        sf = adata.uns["spatial"][lib]["scalefactors"]
        mpp = adata.uns["tissuegraph"]["microns_per_pixel"]
        side_px = case["sizes_um"][0] / mpp  # full-res px
        spot_scale = side_px / sf["spot_diameter_fullres"]
        with measure() as m:
            path = adata.uns["tissuegraph"].get("image_path")
            if path:
                ic = sq.im.ImageContainer(path, library_id=lib, lazy=False)
                scale_img = 1.0
            else:
                img = adata.uns["spatial"][lib]["images"]["lowres"]
                scale_img = sf["tissue_lowres_scalef"]
                ic = sq.im.ImageContainer(img, library_id=lib, scale=scale_img)
            crop_side = side_px * scale_img
            n = 0
            for crop in ic.generate_spot_crops(
                adata,
                library_id=lib,
                spot_scale=spot_scale,
                scale=CROP_PX / max(crop_side, 1.0),
                as_array="image",
            ):
                np.asarray(crop)
                n += 1
        out["crops"] = m.as_dict()
        out["n_crops"] = n
    return out


def worker(case_json: str, method: str) -> None:
    set_threads(int(os.environ.get("TG_BENCH_THREADS", "1")))
    case = json.loads(case_json)
    t0 = time.perf_counter()
    res = run_tissuegraph(case) if method == "tissuegraph" else run_squidpy(case)
    res["total_s"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(res))


# ----------------------------------------------------------------------------- driver side
def _simulate(n: int, path: Path) -> None:
    code = (
        "from tissuegraph.datasets import simulate_slide; from tissuegraph import io; "
        f"a = simulate_slide({n}, image=False, n_genes=200, seed=0); "
        f"io.write_h5ad(a, {str(path)!r})"
    )
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True)


def _spawn(case: dict, method: str) -> dict:
    cmd = [sys.executable, "-W", "ignore", __file__, "--worker", json.dumps(case), method]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {TIMEOUT_S} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["wall_s"] = time.perf_counter() - t0
            return res
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": tail[0][:300]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small synthetic case only (20k)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS/torch threads per process")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/)")
    ap.add_argument("--no-squidpy", action="store_true", help="skip the squidpy runs")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    os.environ["TG_BENCH_THREADS"] = str(args.threads)
    d = data_dir()
    os.environ.setdefault("TISSUEGRAPH_DATA", str(d))
    tmp = Path(tempfile.mkdtemp(prefix="tg_bench_"))
    cases = [
        {
            "name": "dlpfc_151673",
            "kind": "visium",
            "path": str(d / "dlpfc" / "151673"),
            "image": True,
            "sizes_um": [110.0, 330.0, 990.0],
            "n_top": 2000,
        },
        {
            "name": "her2st_C3",
            "kind": "st",
            "path": str(d / "her2st" / "C3"),
            "image": True,
            "sizes_um": [200.0, 600.0, 1800.0],
            "n_top": 2000,
        },
    ]
    sizes = [20_000] if args.quick else [100_000, 1_000_000]
    for n in sizes:
        p = tmp / f"synthetic_{n}.h5ad"
        print(f"simulating {n:,} spots ...", flush=True)
        _simulate(n, p)
        cases.append(
            {
                "name": f"synthetic_{n // 1000}k",
                "kind": "h5ad",
                "path": str(p),
                "image": False,
                "sizes_um": [110.0, 330.0, 990.0],
                "n_top": 0,
            }
        )
    runs = []
    for case in cases:
        rec = {"case": case["name"], "image": case["image"]}
        for method in ("tissuegraph",) + (() if args.no_squidpy else ("squidpy",)):
            print(f"{case['name']}: {method} ...", flush=True)
            rec[method] = _spawn(case, method)
            if "error" in rec[method]:
                print(f"  error: {rec[method]['error']}", flush=True)
        runs.append(rec)
    for p in tmp.glob("*"):
        p.unlink()
    tmp.rmdir()

    def sec(r, m, step):
        return (r.get(m) or {}).get(step, {}).get("seconds")

    rows, targets = [], []
    for r in runs:
        tg = r.get("tissuegraph", {})
        g_tg, g_sq = sec(r, "tissuegraph", "spot_graph"), sec(r, "squidpy", "spot_graph")
        w_tg, w_sq = tg.get("spot_graph_warm_s"), (r.get("squidpy") or {}).get("spot_graph_warm_s")
        c_tg, c_sq = sec(r, "tissuegraph", "crops"), sec(r, "squidpy", "crops")
        b_tg = sec(r, "tissuegraph", "build")
        sq_total = (g_sq or 0) + (c_sq or 0) if g_sq is not None else None
        ratio = lambda a, b: (a / b) if (a and b) else None  # noqa: E731
        r["ratios"] = {
            "spot_graph": ratio(g_sq, g_tg),
            "spot_graph_warm": ratio(w_sq, w_tg),
            "crops": ratio(c_sq, c_tg),
            "same_steps": ratio(sq_total, (g_tg or 0) + (c_tg or 0)),
            "full_build_vs_squidpy_steps": ratio(sq_total, b_tg),
        }
        peak = (tg.get("build") or {}).get("peak_rss_mb")
        rows.append(
            [
                r["case"],
                tg.get("n_spots"),
                g_tg,
                g_sq,
                r["ratios"]["spot_graph"],
                w_tg,
                w_sq,
                r["ratios"]["spot_graph_warm"],
                c_tg,
                c_sq,
                r["ratios"]["crops"],
                b_tg,
                r["ratios"]["full_build_vs_squidpy_steps"],
                peak,
            ]
        )
        if r["ratios"]["same_steps"] is not None:
            targets.append(
                Target(
                    f"{r['case']}: squidpy / tissuegraph (graph + crops)",
                    r["ratios"]["same_steps"],
                    5.0,
                    ">=",
                    "x",
                )
            )
        if r["case"].startswith("synthetic") and r["ratios"]["spot_graph_warm"] is not None:
            targets.append(
                Target(
                    f"{r['case']}: squidpy / tissuegraph (spot graph, warm median; "
                    f"first call {r['ratios']['spot_graph']:.1f}x)",
                    r["ratios"]["spot_graph_warm"],
                    5.0,
                    ">=",
                    "x",
                )
            )
        if r["case"] == "synthetic_1000k" and b_tg is not None:
            targets.append(Target("1M spots, full build time", b_tg, 60.0, "<=", " s"))
            targets.append(
                Target(
                    "1M spots, peak RSS (incl. the loaded AnnData)",
                    peak / 1024 if peak else None,
                    6.0,
                    "<=",
                    " GB",
                )
            )
    cols = [
        "case",
        "spots",
        "graph tg s",
        "graph sq s",
        "graph x",
        "warm graph tg s",
        "warm graph sq s",
        "warm graph x",
        "crops tg s",
        "crops sq s",
        "crops x",
        "full build tg s",
        "full vs sq x",
        "build peak RSS MB",
    ]
    title = "Graph building: tissuegraph vs squidpy (same slide, same run)"
    notes = [
        f"{args.threads} thread(s) per process; one subprocess per case x method",
        "ratios > 1: tissuegraph faster; 'full' = tissuegraph's whole build_slide_graph "
        "(normalise, panel, graph, top-32 expresses edges, 3 patch scales) vs squidpy's graph "
        "+ spot crops only",
        "peak RSS includes the AnnData read before the measured call",
        f"'graph' columns: the first call in a fresh process; 'warm graph': median of "
        f"{WARM_REPEATS} further calls (imports, lazy set-up and first-touch page faults paid)",
    ]
    print_summary(title, cols, rows, targets, notes)
    path = write_results(
        results_path("build_graphs", args.quick, args.out),
        benchmark="build_graphs",
        title=title,
        quick=args.quick,
        params={
            "crop_px": CROP_PX,
            "threads": args.threads,
            "sizes": sizes,
            "cases": [c["name"] for c in cases],
        },
        runs=runs,
        table=(cols, rows),
        targets=targets,
        notes=notes,
        argv=sys.argv if argv is None else ["benchmarks/build_graphs.py", *argv],
    )
    print(f"\nwrote {path}")
    _ = command_line
    return 0


if __name__ == "__main__":
    sys.exit(main())
