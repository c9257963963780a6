"""Pretraining throughput on DLPFC 151673: image-free recipe, frozen features, pixels.

In one process, on the same slide (DLPFC 151673, one 3,639-spot section = one tile):

- ``recipe``: the shipped spatial-domain recipe as it is (``configs/build/dlpfc.yaml`` +
  ``configs/pretrain/dlpfc.yaml``: image-free graphs, standardised 50-PC input, GCN,
  local-global + reconstruction). The full run trains its 1,000 steps and reports the wall
  time against STAGATE's recorded CPU time on this machine (647 s);
- ``frozen``: the recipe's build config with patches whose frozen resnet10t features are
  stored (``patches.enabled=true patches.encoder.name=resnet10t``), trained with
  ``objectives.contrastive=0.5``;
- ``pixel``: patches stored as uint8 crops, a resnet10t backbone trained with them, and the
  image objectives contrastive / patch_region / localisation on;
- optional variants of ``pixel``: ``--compile`` (``train.compile=true``) and
  ``--channels-last`` (``model.image_encoder.channels_last=true``);
- a STAGATE-like GATv2 graph autoencoder (2 + 2 layers, 512 / 30) on the recipe graph's panel:
  time per full-graph epoch, measured here;
- STAGATE itself (``STAGATE_pyG.train_STAGATE``) only with ``--stagate-python PATH``, a python
  of a separate environment where STAGATE_pyG is installed (never installed by this script);
- on a machine with CUDA, the three configurations again with ``train.device=cuda
  train.precision=bf16``.

spots/s is the median over logged steps after the first (warm-up, compilation); memory is
the peak RSS of this process during each training call (``_common.measure``). Results:
``benchmarks/results/pretrain_throughput[_quick].json``.

    uv run --group bench python benchmarks/pretrain_throughput.py [--quick] [--threads 2]
        [--compile] [--channels-last] [--stagate-python PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ROOT,
    Target,
    build_graph_dir,
    ensure_data_env,
    measure,
    pretrain_checkpoint,
    print_summary,
    results_path,
    set_threads,
    write_results,
)

NAME = "pretrain_throughput"
TITLE = (
    "Pretraining throughput on DLPFC 151673: image-free recipe, frozen features, pixels (same run)"
)
BUILD_CONFIG = ROOT / "configs" / "build" / "dlpfc.yaml"
PRETRAIN_CONFIG = ROOT / "configs" / "pretrain" / "dlpfc.yaml"
SLIDE = "151673"
#: STAGATE (STAGATE_pyG, 1,000 epochs) on DLPFC 151673, CPU time recorded on this machine
STAGATE_REFERENCE_S = 647.0
RECIPE_STEPS = 1000  # configs/pretrain/dlpfc.yaml train.max_steps
TARGET_FROZEN_SPS = 2000.0
TARGET_PIXEL_SPS = 300.0
TARGET_SPEEDUP = 10.0
GPU_NOT_RUN = "GPU: not run (no GPU on this machine)"

#: graphs: the recipe's build config plus these overrides
GRAPHS = {
    "recipe": [],
    "frozen": ["patches.enabled=true", "patches.encoder.name=resnet10t"],
    "pixel": ["patches.enabled=true", "patches.encoder.name=null"],
}
IMAGE_OBJECTIVES = [
    "objectives.contrastive=0.5",
    "objectives.patch_region=0.5",
    "objectives.localisation=0.5",
]
PIXEL_MODEL = ["model.image_encoder.name=resnet10t", "model.image_encoder.freeze=false"]
#: configuration -> (graphs, pretrain overrides on top of configs/pretrain/dlpfc.yaml, label)
CONFIGS: dict[str, tuple[str, list[str], str]] = {
    "recipe": ("recipe", [], "image-free recipe (shipped configs)"),
    "frozen": (
        "frozen",
        ["objectives.contrastive=0.5"],
        "frozen resnet10t features + contrastive 0.5",
    ),
    "pixel": (
        "pixel",
        PIXEL_MODEL + IMAGE_OBJECTIVES,
        "pixel crops, resnet10t trained, contrastive/patch_region/localisation 0.5",
    ),
    "pixel_compile": (
        "pixel",
        PIXEL_MODEL + IMAGE_OBJECTIVES + ["train.compile=true"],
        "pixel + torch.compile",
    ),
    "pixel_channels_last": (
        "pixel",
        PIXEL_MODEL + IMAGE_OBJECTIVES + ["model.image_encoder.channels_last=true"],
        "pixel + channels-last",
    ),
}


@dataclass
class Settings:
    quick: bool = False
    threads: int = 2
    n_top: int | None = None  # None: the build config's panel size (3,000)
    recipe_steps: int | None = None  # None: the recipe's own 1,000 steps
    frozen_steps: int = 200
    pixel_steps: int = 20
    baseline_epochs: int = 20
    compile: bool = False
    channels_last: bool = False
    gpu: bool = True  # when CUDA is available
    stagate_python: str | None = None
    stagate_epochs: int = 1000
    extra_pretrain: list[str] = field(default_factory=list)

    @classmethod
    def quick_settings(cls, **kw) -> Settings:
        base = dict(
            quick=True,
            recipe_steps=5,
            frozen_steps=3,
            pixel_steps=2,
            baseline_epochs=2,
            stagate_epochs=5,
        )
        base.update(kw)
        return cls(**base)


# ----------------------------------------------------------------------------- data
def dlpfc_spec(sample: str = SLIDE):
    from tissuegraph.graph.config import SlideSpec

    root = ensure_data_env()
    return SlideSpec(
        name=str(sample),
        format="visium",
        path=str(root / "dlpfc" / str(sample)),
        library_id=str(sample),
    )


def build_all(spec, workdir: Path, s: Settings, kinds) -> dict[str, dict]:
    """One graphs folder per kind of input (recipe / frozen / pixel); build time and memory."""
    out = {}
    for kind in kinds:
        with measure() as m:
            manifest = build_graph_dir(
                [spec],
                workdir / f"graphs_{kind}",
                n_top=s.n_top,
                patches=None,  # the overrides decide
                overrides=GRAPHS[kind],
                config=BUILD_CONFIG,
            )
        out[kind] = {
            "dir": workdir / f"graphs_{kind}",
            "n_genes": len(manifest["genes"]),
            "build": m.as_dict("build_"),
        }
    return out


# ----------------------------------------------------------------------------- tissuegraph
def _steps_for(name: str, s: Settings) -> int:
    if name == "recipe":
        return s.recipe_steps or RECIPE_STEPS
    return s.frozen_steps if name == "frozen" else s.pixel_steps


def train_config(
    name: str, graphs: dict, workdir: Path, s: Settings, device: str = "cpu", tag: str = ""
) -> dict[str, Any]:
    """Pretrain one configuration; spots/s (median over steps 2..N), wall, peak RSS."""
    import torch

    kind, overrides, label = CONFIGS[name]
    steps = _steps_for(name, s)
    run_dir = workdir / f"run_{name}{tag}"
    ov = [
        f"train.max_steps={steps}",  # the recipe's warm-up (0) is kept
        f"train.threads={s.threads}",
        "train.log_every=1",
        "train.ckpt_every_min=0",
        *overrides,
        *s.extra_pretrain,
    ]
    if device.startswith("cuda"):
        ov.append("train.precision=bf16")
        torch.cuda.reset_peak_memory_stats()
    rec: dict[str, Any] = {
        "config": name,
        "label": label,
        "device": device,
        "precision": "bf16" if device.startswith("cuda") else "fp32",
        "steps": steps,
        "overrides": GRAPHS[kind] + overrides,
    }
    try:
        with measure() as m:
            pretrain_checkpoint(
                graphs[kind]["dir"],
                run_dir,
                steps=None,
                device=device,
                overrides=ov,
                config=PRETRAIN_CONFIG,
            )
    except Exception as exc:  # one failing configuration must not lose the others
        rec["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return rec
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sps = [r["spots_per_s"] for r in rows if "spots_per_s" in r]
    steady = sps[1:] if len(sps) > 1 else sps
    med = float(np.median(steady))
    spots_per_step = graphs[kind].get("n_spots")
    rec.update(
        status="ok",
        spots_per_s=med,
        first_step_spots_per_s=sps[0] if sps else None,
        s_per_step=(spots_per_step / med) if spots_per_step and med > 0 else None,
        wall_s=m.seconds,
        **m.as_dict("train_"),
        final_loss=rows[-1].get("loss") if rows else None,
    )
    if device.startswith("cuda"):
        rec["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return rec


# ----------------------------------------------------------------------------- baselines
class _GATv2AutoEncoder:
    """STAGATE-like: GATv2 encoder G -> 512 -> 30, GATv2 decoder 30 -> 512 -> G."""

    @staticmethod
    def make(n_genes: int, hidden: int = 512, latent: int = 30):
        import torch
        from torch import nn
        from torch_geometric.nn import GATv2Conv

        class GATv2AutoEncoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.e1 = GATv2Conv(n_genes, hidden, add_self_loops=True)
                self.e2 = GATv2Conv(hidden, latent, add_self_loops=True)
                self.d1 = GATv2Conv(latent, hidden, add_self_loops=True)
                self.d2 = nn.Linear(hidden, n_genes)

            def forward(self, x, edge_index):
                h = torch.nn.functional.elu(self.e1(x, edge_index))
                z = self.e2(h, edge_index)
                h = torch.nn.functional.elu(self.d1(z, edge_index))
                return self.d2(h)

        return GATv2AutoEncoder()


def gatv2_baseline(graphs_dir: Path, epochs: int) -> dict[str, Any]:
    """Median time of one full-graph epoch (forward + backward + Adam) on the panel."""
    import torch

    from tissuegraph.graph import schema as S
    from tissuegraph.graph.storage import load_graph, read_manifest

    man = read_manifest(graphs_dir)
    graph = load_graph(Path(graphs_dir) / man["slides"][0]["file"])
    x = graph[S.SPOT][S.X]
    x = (x.to_dense() if x.is_sparse else x).float()
    ei = graph[S.SPOT_NEAR_SPOT].edge_index
    torch.manual_seed(0)
    model = _GATv2AutoEncoder.make(x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    times = []
    with measure() as m:
        for _ in range(epochs + 1):
            t = time.perf_counter()
            loss = ((model(x, ei) - x) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
    epoch_s = float(np.median(times[1:] if len(times) > 1 else times))
    return {
        "config": "gatv2_ae",
        "label": "STAGATE-like GATv2 autoencoder (2+2 layers, 512/30), full graph",
        "device": "cpu",
        "status": "ok",
        "n_spots": int(x.shape[0]),
        "n_genes": int(x.shape[1]),
        "epochs": epochs,
        "epoch_s": epoch_s,
        "spots_per_s": x.shape[0] / epoch_s,
        "est_1000_epochs_s": 1000 * epoch_s,
        **m.as_dict("train_"),
    }


_STAGATE_SCRIPT = r"""
import json, resource, sys, time
path, threads, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import torch
torch.set_num_threads(threads)
import scanpy as sc
import STAGATE_pyG as STAGATE
try:
    adata = sc.read_visium(path, count_file="filtered_feature_bc_matrix.h5")
except AttributeError:  # scanpy without read_visium
    import squidpy as sq
    adata = sq.read.visium(path, counts_file="filtered_feature_bc_matrix.h5")
adata.var_names_make_unique()
sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=3000)
sc.pp.normalize_total(adata, target_sum=1e4)
sc.pp.log1p(adata)
STAGATE.Cal_Spatial_Net(adata, rad_cutoff=150)
t = time.perf_counter()
STAGATE.train_STAGATE(adata, n_epochs=epochs, device=torch.device("cpu"), verbose=False)
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "n_spots": adata.n_obs,
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def stagate_run(python: str | None, slide_path: str, threads: int, epochs: int) -> dict:
    """STAGATE_pyG in a separate python (its own environment), or 'not run'."""
    rec: dict[str, Any] = {
        "config": "stagate",
        "label": "STAGATE (STAGATE_pyG.train_STAGATE, 3,000 HVGs, rad_cutoff 150)",
        "device": "cpu",
        "epochs": epochs,
    }
    if not python:
        rec["status"] = "not run (no --stagate-python given)"
        return rec
    try:
        out = subprocess.run(
            [python, "-c", _STAGATE_SCRIPT, slide_path, str(threads), str(epochs)],
            capture_output=True,
            text=True,
            timeout=4 * 3600,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        rec["status"] = f"failed: {type(exc).__name__}: {exc}"
        return rec
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        rec["status"] = f"failed: {tail[:200]}"
        return rec
    res = json.loads(out.stdout.strip().splitlines()[-1])
    rec.update(
        status="ok",
        seconds=res["seconds"],
        n_spots=res["n_spots"],
        spots_per_s=res["n_spots"] * epochs / res["seconds"],
        est_1000_epochs_s=res["seconds"] * 1000 / epochs,
        peak_rss_mb=res["ru_maxrss_mb"],
        python=python,
    )
    return rec


# ----------------------------------------------------------------------------- run
def run(spec, workdir: Path, s: Settings) -> tuple[list[dict], dict]:
    """Build the three graph folders, train every configuration, run the baselines."""
    import torch

    from tissuegraph.graph.storage import read_manifest

    names = ["recipe", "frozen", "pixel"]
    if s.compile:
        names.append("pixel_compile")
    if s.channels_last:
        names.append("pixel_channels_last")
    graphs = build_all(spec, workdir, s, list(GRAPHS))
    for g in graphs.values():
        g["n_spots"] = int(read_manifest(g["dir"])["slides"][0]["n_spots"])
    runs = [train_config(n, graphs, workdir, s) for n in names]
    for r in runs:
        r["n_spots"] = graphs[CONFIGS[r["config"]][0]]["n_spots"]
    gpu: dict[str, Any] = {"status": GPU_NOT_RUN}
    if s.gpu and torch.cuda.is_available():
        gpu = {"status": "ok", "name": torch.cuda.get_device_name(0)}
        for n in names:
            rec = train_config(n, graphs, workdir, s, device="cuda", tag="_cuda")
            rec["n_spots"] = graphs[CONFIGS[n][0]]["n_spots"]
            runs.append(rec)
    elif s.gpu is False:
        gpu = {"status": "GPU: not run (--no-gpu)"}
    runs.append(gatv2_baseline(graphs["recipe"]["dir"], s.baseline_epochs))
    runs.append(stagate_run(s.stagate_python, spec.path, s.threads, s.stagate_epochs))
    info = {
        "gpu": gpu,
        "graphs": {k: {kk: vv for kk, vv in v.items() if kk != "dir"} for k, v in graphs.items()},
    }
    return runs, info


def _recipe_seconds(runs: list[dict], s: Settings) -> tuple[float | None, str]:
    """The recipe's 1,000-step wall time: measured (full run) or estimated (fewer steps)."""
    rec = next((r for r in runs if r["config"] == "recipe" and r["device"] == "cpu"), None)
    if not rec or rec.get("status") != "ok":
        return None, "recipe not measured"
    if rec["steps"] == RECIPE_STEPS:
        return rec["wall_s"], f"measured: {RECIPE_STEPS:,} steps incl. setup and checkpoint"
    est = RECIPE_STEPS * rec["s_per_step"]
    return est, f"estimated from {rec['steps']} steps: 1,000 x median s/step (no setup)"


def summarise(runs: list[dict], info: dict, s: Settings):
    """Table, targets and notes of the results file."""
    cols = [
        "configuration",
        "device",
        "steps / epochs",
        "spots/s",
        "s / step (epoch)",
        "peak RSS MiB",
        "added RSS MiB",
        "status",
    ]
    rows = []
    for r in runs:
        ok = r.get("status") == "ok"
        per = r.get("s_per_step", r.get("epoch_s", r.get("seconds")))
        rows.append(
            [
                r["config"],
                r["device"] + (" bf16" if r.get("precision") == "bf16" else ""),
                r.get("steps", r.get("epochs")),
                round(r["spots_per_s"], 1) if ok and r.get("spots_per_s") else None,
                round(per, 3) if ok and per else None,
                round(r.get("train_peak_rss_mb") or r.get("peak_rss_mb") or 0) if ok else None,
                round(r["train_added_rss_mb"]) if ok and "train_added_rss_mb" in r else None,
                r.get("status", "?")[:60],
            ]
        )

    def sps(name: str) -> float | None:
        r = next((r for r in runs if r["config"] == name and r["device"] == "cpu"), None)
        return r.get("spots_per_s") if r and r.get("status") == "ok" else None

    ctx = f"CPU, {s.threads} torch thread(s), DLPFC {SLIDE} (one whole-slide tile per step)"
    recipe_s, how = _recipe_seconds(runs, s)
    speedup = STAGATE_REFERENCE_S / recipe_s if recipe_s else None
    targets = [
        Target(
            "frozen-feature pretraining", sps("frozen"), TARGET_FROZEN_SPS, ">=", " spots/s", ctx
        ),
        Target("pixel pretraining", sps("pixel"), TARGET_PIXEL_SPS, ">=", " spots/s", ctx),
        Target(
            "DLPFC recipe vs STAGATE (647 s / recipe 1,000-step wall)",
            speedup,
            TARGET_SPEEDUP,
            ">=",
            "x",
            f"STAGATE: recorded reference, 647 s CPU on this machine; recipe "
            f"{recipe_s:.1f} s ({how})"
            if recipe_s
            else "recipe not measured",
        ),
    ]
    stagate = next(r for r in runs if r["config"] == "stagate")
    gat = next(r for r in runs if r["config"] == "gatv2_ae")
    notes = [
        f"recipe: {CONFIGS['recipe'][2]}; frozen: {CONFIGS['frozen'][2]}; pixel: "
        f"{CONFIGS['pixel'][2]}; graphs from configs/build/dlpfc.yaml (+ patches for frozen "
        "and pixel), training from configs/pretrain/dlpfc.yaml plus the listed overrides",
        f"STAGATE reference: 647 s of CPU time for STAGATE_pyG (1,000 epochs) on DLPFC "
        f"{SLIDE}, recorded earlier on this machine (2 cores), not measured in this run; "
        + (
            f"ratio 647 / recipe = {speedup:.1f}x (recipe {recipe_s:.1f} s, {how})"
            if speedup
            else "recipe not measured"
        ),
        f"STAGATE in this run: {stagate['status']}"
        + (
            f" ({stagate['seconds']:.1f} s for {stagate['epochs']} epochs, "
            f"{stagate['est_1000_epochs_s']:.0f} s per 1,000)"
            if stagate.get("status") == "ok"
            else ""
        ),
        f"GATv2 autoencoder (STAGATE-like, measured here on the same {gat['n_genes']}-gene "
        f"panel): {gat['epoch_s']:.3f} s / epoch, about {gat['est_1000_epochs_s']:.0f} s for "
        "1,000 epochs",
        info["gpu"]["status"]
        if info["gpu"]["status"] != "ok"
        else f"GPU: {info['gpu']['name']}, bf16 autocast (rows with device cuda)",
        "spots/s: median over steps 2..N of the run's metrics.jsonl (step 1 holds warm-up "
        "and compilation); peak RSS: largest resident set of this process during the "
        "training call, which includes what earlier stages left allocated (added RSS: above "
        "the level at its start)",
    ]
    if s.quick:
        notes.append("quick run: a few steps per configuration; numbers are indicative only")
    return cols, rows, targets, notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few steps per configuration")
    ap.add_argument("--threads", type=int, default=2, help="torch / BLAS threads")
    ap.add_argument("--slide", default=SLIDE, help="DLPFC section (default 151673)")
    ap.add_argument("--frozen-steps", type=int, default=None)
    ap.add_argument("--pixel-steps", type=int, default=None)
    ap.add_argument(
        "--recipe-steps",
        type=int,
        default=None,
        help="default: the recipe's own 1,000 (quick: 5; fewer steps estimate the 1,000)",
    )
    ap.add_argument("--compile", action="store_true", help="also pixel with torch.compile")
    ap.add_argument(
        "--channels-last", action="store_true", help="also pixel with channels-last backbone"
    )
    ap.add_argument("--no-gpu", action="store_true", help="skip the CUDA bf16 runs")
    ap.add_argument(
        "--stagate-python",
        default=None,
        metavar="PATH",
        help="python of an environment with STAGATE_pyG installed (else STAGATE: not run)",
    )
    ap.add_argument("--workdir", default=None, help="default: a temporary folder")
    ap.add_argument("--out", default=None)
    ap.add_argument("pretrain_overrides", nargs="*", help="key=value for every configuration")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    kw: dict[str, Any] = dict(
        threads=args.threads,
        compile=args.compile,
        channels_last=args.channels_last,
        gpu=not args.no_gpu,
        stagate_python=args.stagate_python,
        extra_pretrain=list(args.pretrain_overrides),
    )
    for key in ("frozen_steps", "pixel_steps", "recipe_steps"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    s = Settings.quick_settings(**kw) if args.quick else Settings(**kw)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tg_throughput_"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs, info = run(dlpfc_spec(args.slide), workdir, s)
    cols, rows, targets, notes = summarise(runs, info, s)
    params = asdict(s)
    params.update(
        slide=args.slide,
        elapsed_s=round(time.perf_counter() - t0, 1),
        stagate_reference_s=STAGATE_REFERENCE_S,
        build_config=str(BUILD_CONFIG.relative_to(ROOT)),
        pretrain_config=str(PRETRAIN_CONFIG.relative_to(ROOT)),
    )
    out = write_results(
        results_path(NAME, s.quick, args.out),
        benchmark=NAME,
        title=TITLE,
        quick=s.quick,
        params=params,
        runs=runs,
        table=(cols, rows),
        targets=targets,
        notes=notes,
        extra=info,
    )
    print_summary(TITLE, cols, rows, targets, notes)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
