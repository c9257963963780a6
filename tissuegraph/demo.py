"""End-to-end demo on the simulated slide: simulate, build, pretrain, embed, niches, report.

``tissuegraph demo --out tg_demo`` (or :func:`run_demo`) runs on a laptop CPU in a few
minutes and needs no data: the slide comes from :func:`tissuegraph.datasets.simulate_slide`,
whose true niches score the result.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from tissuegraph._logging import logger
from tissuegraph._utils import write_text_atomic

#: settings of the full and the quick demo
DEMO_SETTINGS = {
    False: {"n_spots": 2000, "max_steps": 400, "crop_px": 16},
    True: {"n_spots": 1000, "max_steps": 300, "crop_px": 16},
}
N_NICHES = 5
BASELINE_HOPS = 1


class _Stages:
    def __init__(self, progress: bool):
        self.progress = progress
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}
        self._last = self.t0
        self._name: str | None = None

    def start(self, name: str, msg: str) -> None:
        self._close()
        self._name = name
        self._last = time.perf_counter()
        if self.progress:
            logger.info("[demo %6.1fs] %s", time.perf_counter() - self.t0, msg)

    def _close(self) -> None:
        if self._name is not None:
            self.times[self._name] = time.perf_counter() - self._last

    def done(self) -> float:
        self._close()
        self._name = None
        return time.perf_counter() - self.t0


def build_config(out_dir: Path, n_spots: int, seed: int, crop_px: int):
    """The demo's ``BuildConfig`` (as ``configs/build/demo.yaml``, sized for the demo)."""
    from tissuegraph.config import with_defaults
    from tissuegraph.graph.config import BuildConfig, SlideSpec

    cfg = with_defaults(BuildConfig)
    cfg.slides = [SlideSpec(name="synthetic", format="synthetic", n_spots=n_spots, seed=seed)]
    cfg.out_dir = str(out_dir / "graphs")
    cfg.seed = seed
    cfg.panel.mode = "all"
    cfg.normalize.method = "log1p_cp10k"
    cfg.spatial.method = "grid"
    cfg.spatial.rings = 1
    cfg.patches.sizes_um = [110.0, 330.0, 990.0]
    cfg.patches.crop_px = crop_px
    # frozen image features stored at build time (random-init backbone offline): training
    # then runs on features, not pixels
    cfg.patches.encoder.name = "resnet10t"
    cfg.priors.expresses_top_k = 32
    return cfg


def pretrain_config(graphs: Path, run_dir: Path, max_steps: int, seed: int):
    """The demo's ``PretrainConfig``: the packaged demo config when present, CPU, few steps."""
    from tissuegraph.config import load_config
    from tissuegraph.train.config import PretrainConfig

    root = Path(__file__).resolve().parents[1]
    yaml = root / "configs" / "pretrain" / "demo.yaml"
    overrides = [
        f"graphs={graphs}",
        f"run_dir={run_dir}",
        f"train.max_steps={max_steps}",
        "train.device=cpu",
    ]
    if not yaml.is_file():  # sized for a 1,000-2,000-spot slide and a short CPU run
        overrides += [
            "train.batch_spots=256",
            f"train.warmup_steps={max(1, max_steps // 10)}",
            "train.log_every=5",
            "train.eval_every=0",
            "train.ckpt_every=0",
            "train.tensorboard=false",
            "model.hidden_dim=64",
            "model.expr_hidden_dim=128",
            "model.proj_dim=64",
        ]
    cfg = load_config(PretrainConfig, yaml if yaml.is_file() else None, overrides)
    if "seed" in cfg:
        cfg.seed = seed
    return cfg


def run_demo(
    out_dir: str | os.PathLike = "tg_demo",
    *,
    quick: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> str:
    """Run the demo end to end and return its report.

    Stages: simulate the demo slide (``quick``: 1,000 spots, else 2,000; 5 true niches)
    -> build its heterogeneous graph -> pretrain the GNN briefly on CPU -> embed ->
    niches with K = the true number (GMM, tied covariance) -> neighbourhood enrichment
    -> figures and report. For context the report also scores a baseline without the model
    (PCA of expression averaged over the first hop ring, same clustering).

    Writes to ``out_dir``: ``demo.h5ad``, ``niches.png`` (niches over the image next to the
    true niches), ``training_curves.png``, ``nhood_enrichment.png``, ``report.txt``, and
    the graphs and the training run in ``graphs/`` and ``run/``.

    Returns
    -------
    The text of ``report.txt`` (ARI of the niches against the simulator's truth).
    """
    import torch
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from tissuegraph import io, pl, tl
    from tissuegraph.datasets import simulate_slide
    from tissuegraph.graph.pipeline import build_graphs
    from tissuegraph.graph.storage import load_graph
    from tissuegraph.train.loop import pretrain

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = DEMO_SETTINGS[bool(quick)]
    stages = _Stages(progress)
    n_threads = torch.get_num_threads()

    stages.start("simulate", f"simulating the demo slide ({s['n_spots']} spots, {N_NICHES} niches)")
    adata = simulate_slide(s["n_spots"], n_niches=N_NICHES, seed=seed)

    stages.start("build", "building its heterogeneous graph")
    bcfg = build_config(out, s["n_spots"], seed, s["crop_px"])
    manifest = build_graphs(bcfg, force=True, progress=False)
    slide = manifest["slides"][0]
    graph = load_graph(Path(bcfg.out_dir) / slide["file"])

    stages.start("pretrain", f"pretraining for {s['max_steps']} steps on CPU")
    pcfg = pretrain_config(Path(bcfg.out_dir), out / "run", s["max_steps"], seed)
    torch.manual_seed(seed)
    ckpt = pretrain(pcfg, resume=False, progress=progress)
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        ckpt = ckpt / "checkpoints" / "last.pt"
    run_dir = out / "run"

    stages.start("embed", "embedding the spots")
    tl.embed(adata, ckpt, graph=graph, device="cpu")

    stages.start("niches", f"finding {N_NICHES} niches")
    tl.niches(adata, n_niches=N_NICHES, random_state=seed)
    truth = adata.obs["true_niche"].astype(str)
    ari = adjusted_rand_score(truth, adata.obs["tg_niche"])
    nmi = normalized_mutual_info_score(truth, adata.obs["tg_niche"])
    tl.nhood_enrichment(adata, cluster_key="tg_niche")

    stages.start("baseline", "scoring the PCA + neighbour-aggregation baseline")
    tl.aggregate_neighbors(adata, n_hops=BASELINE_HOPS, key_added="X_aggregated")
    tl.niches(
        adata,
        n_niches=N_NICHES,
        use_rep="X_aggregated",
        key_added="baseline_niche",
        scale=False,
        random_state=seed,
    )
    ari_base = adjusted_rand_score(truth, adata.obs["baseline_niche"])

    stages.start("figures", "writing demo.h5ad, figures and the report")
    import matplotlib.pyplot as plt

    adata.obs["true_niche"] = adata.obs["true_niche"].astype("category")
    fig = pl.niche_maps(
        adata,
        ["tg_niche", "true_niche"],
        titles=[f"tissuegraph niches (ARI {ari:.2f})", "true niches"],
        save=out / "niches.png",
    )
    plt.close(fig)
    figs = ["niches.png"]
    try:
        fig = pl.training_curves(run_dir, save=out / "training_curves.png")
        plt.close(fig)
        figs.append("training_curves.png")
    except Exception as exc:  # metrics missing: report it, keep the demo's results
        figs.append(f"(training curves not drawn: {exc})")
    ax = pl.nhood_enrichment(adata, cluster_key="tg_niche", save=out / "nhood_enrichment.png")
    plt.close(ax.figure)
    figs.append("nhood_enrichment.png")
    io.write_h5ad(adata, out / "demo.h5ad")
    total = stages.done()

    lines = [
        "tissuegraph demo",
        "================",
        f"slide: simulated, {adata.n_obs} spots x {adata.n_vars} genes, {N_NICHES} true niches "
        f"(seed {seed}{', quick' if quick else ''})",
        f"graph: {slide['node_counts']}",
        f"pretraining: {s['max_steps']} steps on CPU, checkpoint {ckpt}",
        "",
        f"niche ARI vs truth (tissuegraph embedding, GMM K={N_NICHES}): {ari:.3f}  (NMI {nmi:.3f})",
        f"baseline ARI (PCA + {BASELINE_HOPS}-hop neighbour mean, same GMM): {ari_base:.3f}",
        "",
        "time per stage: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in stages.times.items())
        + f"; total {total:.1f}s",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {n_threads}",
        "outputs: demo.h5ad, " + ", ".join(figs) + ", graphs/, run/",
    ]
    report = "\n".join(lines) + "\n"
    write_text_atomic(out / "report.txt", report)
    if progress:
        logger.info("[demo %6.1fs] done: %s", total, out / "report.txt")
    return report


def demo_ari(report: str) -> float:
    """The niche ARI from a demo report."""
    for line in report.splitlines():
        if line.startswith("niche ARI"):
            return float(line.split(":")[1].split()[0])
    raise ValueError("no niche ARI in the report")


__all__ = ["DEMO_SETTINGS", "demo_ari", "run_demo"]
