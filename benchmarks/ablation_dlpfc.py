"""Ablation of the DLPFC spatial-domain recipe: which input, relations and objectives help.

Each variant is the shipped recipe (``configs/build/dlpfc.yaml`` + ``configs/pretrain/dlpfc.yaml``)
with one change, pretrained per section and clustered exactly as in ``domains_dlpfc.py``
(``tl.niches`` tied GMM, ``n_init`` 10, ARI on labelled spots). Results go to
``benchmarks/results/ablation_dlpfc.json`` and, as a markdown table, to ``docs/ablation.md``
(between the ``ABLATION`` markers).

Run ``uv run python benchmarks/ablation_dlpfc.py [--sections 151673 151674] [--seeds 1] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import domains_dlpfc as D  # noqa: E402
from _common import (  # noqa: E402
    ensure_data_env,
    markdown_table,
    mean_sd,
    results_path,
    set_threads,
    write_results,
)

NAME = "ablation_dlpfc"
TITLE = "Ablation of the DLPFC domain recipe (per-section ARI, K = 7)"
DOC = Path(__file__).resolve().parent.parent / "docs" / "ablation.md"


def _priors() -> list[str]:
    pri = ensure_data_env() / "priors"
    return [
        f"priors.tf_targets={pri / 'collectri_human.csv'}",
        f"priors.pathways={pri / 'progeny_human_top100.tsv'}",
    ]


#: name -> (what changes, build overrides, pretrain overrides, patches)
VARIANTS = {
    "recipe": ("shipped recipe: spot graph only, local_global + reconstruction", [], [], None),
    "genes": ("+ gene nodes (spot-expresses-gene messages)", [], ["model.use_genes=true"], None),
    "genes_priors": (
        "+ gene and pathway nodes with CollecTRI / PROGENy prior edges",
        "priors",
        ["model.use_genes=true"],
        None,
    ),
    "patches": (
        "+ lowres image patches (frozen resnet10t features) and image-expression contrast",
        ["patches.encoder.name=resnet10t"],
        ["objectives.contrastive=0.5"],
        True,
    ),
    "residual": ("residual connections in the GNN", [], ["model.residual=true"], None),
    "mlp_input": (
        "MLP input encoder (50 -> 256 -> 32, LayerNorm), LayerNorm after each layer, "
        "dropout 0.1, 32-d (the previous recipe)",
        [],
        [
            "model.expr_hidden_dim=256",
            "model.norm=true",
            "model.hidden_dim=32",
            "model.dropout=0.1",
        ],
        None,
    ),
    "no_standardize": (
        "no standardisation (log1p values in, no PCA basis)",
        ["normalize.scale=false"],
        [],
        None,
    ),
    "local_global_only": ("local_global alone", [], ["objectives.reconstruction=0"], None),
    "reconstruction_only": ("reconstruction alone", [], ["objectives.local_global=0"], None),
    "plus_masked_feature": (
        "+ masked_feature (GraphMAE, 25% of spots hidden)",
        [],
        ["objectives.masked_feature=1.0"],
        None,
    ),
    "masked_expression_only": (
        "masked_expression alone (the 0.1 objective)",
        [],
        [
            "objectives.local_global=0",
            "objectives.reconstruction=0",
            "objectives.masked_expression=1.0",
        ],
        None,
    ),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", nargs="+", default=["151673", "151674"])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    set_threads(a.threads)
    t0 = time.perf_counter()
    sections = [D.load_dlpfc(x) for x in a.sections]
    base = D.Settings(
        seeds=list(range(a.seeds)),
        methods=["tissuegraph"],
        protocols=["per_section"],
    )
    runs, rows = [], []
    for name in a.variants:
        what, bov, pov, patches = VARIANTS[name]
        bov = _priors() if bov == "priors" else list(bov)
        s = replace(base, build_overrides=bov, pretrain_overrides=list(pov), patches=patches)
        tmp = Path(tempfile.mkdtemp(prefix="tg_ablation_"))
        try:
            got = D.run(sections, s, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for r in got:
            r["variant"] = name
        runs += got
        aris = [r["ari"] for r in got]
        m, sd = mean_sd(aris)
        secs = mean_sd([r["pretrain_s"] for r in got])[0]
        rows.append([name, what, f"{m:.3f}" + (f" ± {sd:.3f}" if len(aris) > 1 else ""), secs])
        print(f"{name:<24} ARI {m:.3f} ({len(aris)} runs) pretrain {secs:.0f}s", flush=True)
    cols = ["variant", "change from the recipe", "ARI", "pretrain s"]
    path = write_results(
        results_path(NAME, False, a.out),
        benchmark=NAME,
        title=TITLE,
        quick=False,
        params={**asdict(base), "sections": a.sections, "elapsed_s": time.perf_counter() - t0},
        runs=runs,
        table=(cols, rows),
        targets=[],
        notes=[
            "one change at a time from the shipped DLPFC recipe; same clustering as "
            "domains_dlpfc.py; the DLPFC folders hold only the lowres H&E (a spot is ~4 px)",
            "ARI: mean ± sd over sections x seeds x {unscaled, scaled} clustering",
        ],
    )
    table = markdown_table(cols, rows)
    if DOC.is_file() and a.out is None:
        text = DOC.read_text()
        block = (
            f"<!-- ABLATION:START -->\nSections {', '.join(a.sections)}, {a.seeds} seed(s), "
            f"`uv run python benchmarks/ablation_dlpfc.py`:\n\n{table}\n<!-- ABLATION:END -->"
        )
        text = re.sub(r"<!-- ABLATION:START -->.*<!-- ABLATION:END -->", block, text, flags=re.S)
        DOC.write_text(text)
    print(f"\n{table}\nwrote {path}")
    return {"path": path, "runs": runs}


if __name__ == "__main__":
    main()
