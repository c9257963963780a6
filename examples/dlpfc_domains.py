"""Spatial domains of DLPFC 151673: build -> pretrain -> embed -> niches (K=7) -> ARI.

Data: set $TISSUEGRAPH_DATA to a folder holding dlpfc/151673 (a Space Ranger output folder
with layers.tsv). The section is public: spatialLIBD (Maynard et al., Nat Neurosci 2021;
github.com/LieberInstitute/HumanPilot), counts e.g. from github.com/prabhakarlab/Banksy.

    python examples/dlpfc_domains.py [--steps 200] [--out dlpfc_run] [--device auto]

Writes <out>/niches.png (niches over the H&E next to the manual layers), <out>/dlpfc.h5ad
and prints the ARI of the model's niches and of the PCA + aggregation baseline.
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
    p.add_argument("--steps", type=int, default=200, help="pretraining steps")
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    import pandas as pd
    from omegaconf import OmegaConf
    from sklearn.metrics import adjusted_rand_score

    from tissuegraph import io, pl, tl
    from tissuegraph.config import load_config
    from tissuegraph.graph.config import BuildConfig, SlideSpec
    from tissuegraph.graph.pipeline import build_graphs
    from tissuegraph.train.config import PretrainConfig
    from tissuegraph.train.loop import pretrain

    sample = data_dir() / "dlpfc" / "151673"
    out = Path(args.out)

    # 1. config -> graphs (one slide, 2,000 HVGs, hex grid, 3 patch scales)
    cfg = OmegaConf.structured(BuildConfig)
    cfg.slides = [SlideSpec(name="151673", format="visium", path=str(sample))]
    cfg.out_dir = str(out / "graphs")
    cfg.panel.n_top = 2000
    build_graphs(cfg)

    # 2. pretrain (short; raise --steps for better embeddings)
    pcfg = load_config(
        PretrainConfig,
        None,
        [
            f"graphs={out / 'graphs'}",
            f"run_dir={out / 'run'}",
            f"train.max_steps={args.steps}",
            f"train.device={args.device}",
        ],
    )
    pretrain(pcfg)
    ckpt = out / "run" / "checkpoints" / "last.pt"

    # 3. embed + niches with K = 7 (L1-L6, WM)
    adata = io.read_visium(sample, library_id="151673")
    tl.embed(adata, ckpt, device=args.device)
    tl.niches(adata, n_niches=7)
    layers = pd.read_csv(sample / "layers.tsv", sep="\t", index_col=0)["layer"]
    adata.obs["layer"] = pd.Categorical(layers.reindex(adata.obs_names))
    m = adata.obs["layer"].notna().to_numpy()
    ari = adjusted_rand_score(adata.obs["layer"][m], adata.obs["tg_niche"][m])

    # baseline for context: PCA + 3-hop neighbour aggregation, same GMM
    tl.aggregate_neighbors(adata, n_hops=3)
    tl.niches(adata, n_niches=7, use_rep="X_aggregated", key_added="baseline_niche")
    ari_base = adjusted_rand_score(adata.obs["layer"][m], adata.obs["baseline_niche"][m])
    print(f"ARI vs manual layers: tissuegraph {ari:.3f}, PCA + aggregation baseline {ari_base:.3f}")

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
