"""Spatial domains of DLPFC 151673: build -> pretrain -> embed -> niches (K=7) -> ARI.

Data: set $TISSUEGRAPH_DATA to a folder holding dlpfc/151673 (a Space Ranger output folder
with layers.tsv). The section is public: spatialLIBD (Maynard et al., Nat Neurosci 2021;
github.com/LieberInstitute/HumanPilot), counts e.g. from github.com/prabhakarlab/Banksy.

    python examples/dlpfc_domains.py [--out dlpfc_run] [--device auto] [--section 151673]
                                     [--models 5]

The graphs and the pretraining follow the shipped recipe (configs/build/dlpfc.yaml,
configs/pretrain/dlpfc.yaml), as benchmarks/domains_dlpfc.py does. ``--models N`` pretrains
N models (seeds 0..N-1) and takes the majority vote of their niches, the benchmark's
``tissuegraph_consensus`` arm (N = 5 by default; ``--models 1``: one model).

Writes <out>/niches.png (niches over the H&E next to the manual layers), <out>/dlpfc.h5ad
and prints the ARI of the model's niches (the vote and the first model alone) and of the
PCA + aggregation baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def data_dir() -> Path:
    root = os.environ.get("TISSUEGRAPH_DATA")
    if not root or not (Path(root) / "dlpfc" / "151673").is_dir():
        sys.exit(
            "set TISSUEGRAPH_DATA to the folder holding dlpfc/151673 (spatialLIBD DLPFC, "
            "github.com/LieberInstitute/HumanPilot)"
        )
    return Path(root)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="dlpfc_run")
    p.add_argument("--section", default="151673")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default: recipe)")
    p.add_argument("--device", default="auto")
    p.add_argument("--models", type=int, default=5, help="models (seeds) whose niches vote")
    args = p.parse_args()
    if args.models < 1:
        p.error("--models must be at least 1")

    import pandas as pd
    from sklearn.metrics import adjusted_rand_score

    from tissuegraph import io, pl, tl
    from tissuegraph.config import load_config
    from tissuegraph.graph.config import BuildConfig, SlideSpec
    from tissuegraph.graph.pipeline import build_graphs
    from tissuegraph.train.config import PretrainConfig
    from tissuegraph.train.loop import pretrain

    sample = data_dir() / "dlpfc" / args.section
    out = Path(args.out)
    configs = Path(__file__).resolve().parent.parent / "configs"

    # 1. the recipe's build config on this section -> graphs (3,000 HVGs, scaled, 50 PCs)
    cfg = load_config(BuildConfig, configs / "build" / "dlpfc.yaml")
    cfg.slides = [SlideSpec(name=args.section, format="visium", path=str(sample))]
    cfg.out_dir = str(out / "graphs")
    build_graphs(cfg)

    # 2. pretrain with the recipe, one model per seed (about 40 s each on 2 CPU cores)
    ckpts = []
    for seed in range(args.models):
        overrides = [
            f"graphs={out / 'graphs'}",
            f"run_dir={out / f'run_seed{seed}'}",
            f"seed={seed}",
            f"train.device={args.device}",
        ]
        if args.steps:
            overrides.append(f"train.max_steps={args.steps}")
        pcfg = load_config(PretrainConfig, configs / "pretrain" / "dlpfc.yaml", overrides)
        ckpts.append(pretrain(pcfg))

    # 3. embed with every model, niches with K = 7 (L1-L6, WM): the vote of the models
    adata = io.read_visium(sample, library_id=args.section)
    keys = []
    for i, ckpt in enumerate(ckpts):
        keys.append("X_tissuegraph" if i == 0 else f"X_tissuegraph_{i}")
        tl.embed(adata, ckpt, device=args.device, key_added=keys[-1])
    layers = pd.read_csv(sample / "layers.tsv", sep="\t", index_col=0)["layer"]
    adata.obs["layer"] = pd.Categorical(layers.reindex(adata.obs_names))
    m = adata.obs["layer"].notna().to_numpy()
    tl.niches(adata, n_niches=7, use_rep="X_tissuegraph", key_added="single_niche")
    ari_single = adjusted_rand_score(adata.obs["layer"][m], adata.obs["single_niche"][m])
    tl.niches(adata, n_niches=7, use_rep=keys)
    ari = adjusted_rand_score(adata.obs["layer"][m], adata.obs["tg_niche"][m])

    # baseline for context: PCA + 3-hop neighbour aggregation, same GMM
    tl.aggregate_neighbors(adata, n_hops=3)
    tl.niches(adata, n_niches=7, use_rep="X_aggregated", key_added="baseline_niche")
    ari_base = adjusted_rand_score(adata.obs["layer"][m], adata.obs["baseline_niche"][m])
    print(
        f"ARI vs manual layers: tissuegraph {ari:.3f} (vote of {len(keys)} model(s); the first "
        f"alone {ari_single:.3f}), PCA + aggregation baseline {ari_base:.3f}"
    )

    # 4. figure
    pl.niche_maps(
        adata[m],
        ["tg_niche", "baseline_niche", "layer"],
        titles=[f"tissuegraph (ARI {ari:.2f})", f"baseline (ARI {ari_base:.2f})", "layers"],
        save=out / "niches.png",
    )
    io.write_h5ad(adata, out / "dlpfc.h5ad")
    print(f"wrote {out / 'niches.png'} and {out / 'dlpfc.h5ad'}")


if __name__ == "__main__":
    main()
