"""Image -> expression on HER2+ breast cancer: pretrain on 4 sections, predict the 5th from H&E.

Data: set $TISSUEGRAPH_DATA to a folder holding her2st/{B4,C2,C3,C4,C5} (counts.tsv.gz,
spots.tsv, he.jpg per section) from github.com/almaan/her2st (Andersson et al., Nat Commun
2021).

    python examples/her2st_image_to_expression.py [--holdout C2] [--steps 400] [--genes 50]
        [--method probe|decoder]

Uses the shipped recipe (configs/build/her2st.yaml: frozen multi-scale patch features;
configs/pretrain/her2st.yaml: the image-only decoder, best held-out step kept, ridge probe
stored in the checkpoint). A patient-C section is predicted from the other three C sections,
B4 from C2-C5. The gene panel is chosen on the training sections only; the held-out section's
expression is never shown to the model (prediction from its image alone). Prints the per-gene
Pearson r between predicted and measured log-normalised expression and writes
<out>/expression.png.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SECTIONS = ["B4", "C2", "C3", "C4", "C5"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--holdout", default="C2", choices=SECTIONS)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--genes", type=int, default=50, help="HVG panel size")
    p.add_argument("--method", default="probe", choices=["probe", "decoder"])
    p.add_argument("--out", default="her2st_run")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    root = os.environ.get("TISSUEGRAPH_DATA")
    if not root or not (Path(root) / "her2st" / args.holdout).is_dir():
        sys.exit("set TISSUEGRAPH_DATA to the folder holding her2st/ (github.com/almaan/her2st)")
    her2st = Path(root) / "her2st"

    import numpy as np
    from omegaconf import OmegaConf

    from tissuegraph import io, pl, tl
    from tissuegraph.config import load_config
    from tissuegraph.graph.config import BuildConfig, SlideSpec
    from tissuegraph.graph.pipeline import build_graphs
    from tissuegraph.train.config import PretrainConfig
    from tissuegraph.train.loop import pretrain

    out = Path(args.out)
    patient_c = [s for s in SECTIONS if s.startswith("C")]
    train = [s for s in patient_c if s != args.holdout]
    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_config(BuildConfig, configs / "build" / "her2st.yaml", [])
    cfg.slides = [
        OmegaConf.structured(
            SlideSpec(
                name=s,
                format="st",
                counts=str(her2st / s / "counts.tsv.gz"),
                spots=str(her2st / s / "spots.tsv"),
                image=str(her2st / s / "he.jpg"),
            )
        )
        for s in train
    ]
    cfg.out_dir = str(out / "graphs")
    cfg.panel.n_top = args.genes
    cfg.panel.fit_slides = train
    build_graphs(cfg)

    pcfg = load_config(
        PretrainConfig,
        configs / "pretrain" / "her2st.yaml",
        [
            f"graphs={out / 'graphs'}",
            f"run_dir={out / 'run'}",
            f"train.max_steps={args.steps}",
            f"train.device={args.device}",
        ],
    )
    pretrain(pcfg)

    d = her2st / args.holdout
    held = io.read_st(d / "counts.tsv.gz", d / "spots.tsv", d / "he.jpg", library_id=args.holdout)
    ckpt = out / "run" / "checkpoints" / "best.pt"  # the best held-out step
    pred = tl.predict_expression(held, ckpt, device=args.device, method=args.method)
    r = pred.var["pearson_r"].to_numpy()
    print(
        f"{args.holdout} held out: {pred.n_obs} spots x {pred.n_vars} genes; per-gene Pearson r "
        f"mean {np.nanmean(r):.3f}, median {np.nanmedian(r):.3f}, "
        f"genes with r > 0.3: {(r > 0.3).sum()}"
    )
    print(tl.measured_vs_predicted(pred).head(10).to_string(index=False))
    pl.expression_maps(pred, n_genes=4, save=out / "expression.png")
    io.write_h5ad(pred, out / f"{args.holdout}_predicted.h5ad")
    print(f"wrote {out / 'expression.png'}")


if __name__ == "__main__":
    main()
