"""Niche walkthrough on DLPFC 151673: niches -> composition, enrichment, markers, pathways,
ligand-receptor signalling and (with a checkpoint) what drives a niche.

Data: $TISSUEGRAPH_DATA with dlpfc/151673 and priors/ (PROGENy: saezlab/progeny;
LIANA consensus: saezlab/liana). Without --checkpoint the niches come from the model-free
PCA + neighbour-aggregation baseline and the explain step is skipped.

    python examples/niche_walkthrough.py [--checkpoint run/checkpoints/last.pt] [--out walk]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", default="walkthrough")
    p.add_argument("--niches", type=int, default=7)
    args = p.parse_args()
    root = os.environ.get("TISSUEGRAPH_DATA")
    if not root or not (Path(root) / "dlpfc" / "151673").is_dir():
        sys.exit("set TISSUEGRAPH_DATA to the folder holding dlpfc/ and priors/")
    root = Path(root)

    import pandas as pd

    from tissuegraph import io, pl, tl

    out = Path(args.out)
    adata = io.read_visium(root / "dlpfc" / "151673", library_id="151673")
    layers = pd.read_csv(root / "dlpfc" / "151673" / "layers.tsv", sep="\t", index_col=0)
    adata.obs["layer"] = pd.Categorical(layers["layer"].reindex(adata.obs_names))

    # niches
    if args.checkpoint:
        tl.embed(adata, args.checkpoint)
        rep = "X_tissuegraph"
    else:
        tl.aggregate_neighbors(adata, n_hops=3)
        rep = "X_aggregated"
    tl.niches(adata, n_niches=args.niches, use_rep=rep)

    # which annotated layers make up each niche
    comp = tl.niche_composition(adata, niche_key="tg_niche", cell_types="layer")
    print("composition (fraction of each layer per niche):\n", comp.round(2))

    # which niches touch each other (z-scores, squidpy layout)
    tl.nhood_enrichment(adata, cluster_key="tg_niche")

    # marker genes
    markers = tl.niche_markers(adata, niche_key="tg_niche", n_genes=5)
    print(markers.groupby("niche")["gene"].apply(", ".join).to_string())

    # pathway activity (PROGENy weights)
    pw = io.read_pathways(root / "priors" / "progeny_human_top100.tsv")
    tl.pathway_activity(adata, pw, niche_key="tg_niche")
    print("mean pathway activity per niche:\n", adata.uns["tg_pathways"]["niche_mean"].round(2))

    # ligand -> receptor between neighbouring niches
    lr = io.read_ligand_receptor(root / "priors" / "liana_consensus_human.tsv")
    res = tl.ligand_receptor(adata, lr, niche_key="tg_niche", n_perms=100)
    print("top ligand-receptor interactions:\n", res.head(10).to_string(index=False))

    # what drives niche "0" (needs the model)
    if args.checkpoint:
        ex = tl.explain(adata, "0", checkpoint=args.checkpoint, pathways=pw)
        print("drivers of niche 0:\n", ex.head(15).to_string(index=False))

    written = pl.save_niche_figures(adata, out)
    io.write_h5ad(adata, out / "walkthrough.h5ad")
    print("wrote", ", ".join(str(w) for w in written))


if __name__ == "__main__":
    main()
