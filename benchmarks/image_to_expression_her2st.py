"""Image -> expression on HER2ST: held-out sections, prediction from H&E alone.

Folds: leave one section out over the serial sections C2, C3, C4, C5 of patient C (trained on
the other three), and B4 (patient B) predicted by a model trained on C2-C5, reported apart.
The genes are the 50 most variable genes of the training sections only, the target is their
log1p(CP10k) expression, the score the Pearson correlation between predicted and measured
expression on the held-out spots per gene (genes constant in the held-out section are left
out and counted), its mean, and the number of genes with r > 0.3.

Methods (all in the same run, all fitted on the training sections only)
-----------------------------------------------------------------------
``tissuegraph_probe`` / ``tissuegraph_decoder``
    ``build_graphs`` of the training sections with ``configs/build/her2st.yaml`` (frozen
    multi-scale features: a random-init resnet10t at 112 px on 200 / 600 / 1800 µm patches +
    colour statistics, standardised per slide) -> ``pretrain`` with
    ``configs/pretrain/her2st.yaml`` (the ``image_expression`` decoder, best held-out step
    kept) -> ``tl.predict_expression(method="probe" | "decoder")`` on the held-out section,
    whose counts are zeroed first, so only its image is used.
``backbone_untrained``
    The HEST-style probe (standardise, PCA-256, ridge with the penalty chosen by
    cross-validation grouped by training section) on the backbone's features of the spot's
    200 µm crop (the same random-init resnet10t, 112 px, no per-slide standardisation).
``backbone_pretrained``
    The same probe on the pretrained tissuegraph model's image-side embedding (the fused
    embedding with all expression hidden, 64-d).
``colour_stats``
    The same probe on the mean / sd of R, G, B, H, S, V of the same 200 µm crops (12 features).
``squidpy_features``
    The same probe on ``squidpy.im.calculate_image_features`` (``summary``, ``texture``,
    ``histogram``) of the spot's image.

Foundation-model weights: ``--build-override patches.encoder.name=vit_large_patch16_224
--build-override patches.encoder.checkpoint_path=/path/to/UNI/pytorch_model.bin
--build-override patches.encoder.input_px=224`` (and ``--backbone``/``--checkpoint-path``
for the untrained-backbone probe).

Run ``uv run --group bench python benchmarks/image_to_expression_her2st.py --threads 1``
(about 15 minutes on one CPU thread; ``--quick``: fold C2 only, fewer steps).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ROOT,
    Target,
    build_graph_dir,
    check_training_slides,
    ensure_data_env,
    finish,
    fmt_mean_sd,
    measure,
    pretrain_checkpoint,
    results_path,
    set_threads,
)
from domains_dlpfc import check_checkpoint_slides, log_expression  # noqa: E402

NAME = "image_to_expression_her2st"
TITLE = "Image -> expression on HER2ST (leave-one-section-out, Pearson per gene)"
SECTIONS = ("B4", "C2", "C3", "C4", "C5")
C_SECTIONS = ("C2", "C3", "C4", "C5")
METHODS = (
    "tissuegraph_probe",
    "tissuegraph_decoder",
    "backbone_untrained",
    "backbone_pretrained",
    "colour_stats",
    "squidpy_features",
)
TISSUEGRAPH = ("tissuegraph_probe", "tissuegraph_decoder")
TARGET_RATIO = 1.3
TARGET_MEAN = 0.30
R_GOOD = 0.3
FULL_STEPS = 400
BUILD_CONFIG = ROOT / "configs" / "build" / "her2st.yaml"
PRETRAIN_CONFIG = ROOT / "configs" / "pretrain" / "her2st.yaml"
#: the spot's crop for the baselines: patch_0 of the build config (200 µm at 112 px)
CROP_UM = 200.0
CROP_PX = 112
ST_BUILD: list[str] = []


@dataclass
class Section:
    name: str
    adata: object
    spec: object


@dataclass
class Settings:
    n_genes: int = 50
    steps: int = 400
    seed: int = 0
    folds: list[str] | None = None
    backbone: str = "resnet10t"
    checkpoint_path: str | None = None
    crop_px: int = CROP_PX
    n_pcs: int = 256
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    device: str = "cpu"
    pretrain_overrides: list[str] = field(default_factory=list)
    build_overrides: list[str] = field(default_factory=lambda: list(ST_BUILD))
    squidpy_features: list[str] = field(default_factory=lambda: ["summary", "texture", "histogram"])


# ----------------------------------------------------------------------------- data
def load_her2st(section: str) -> Section:
    from tissuegraph import datasets
    from tissuegraph.graph.config import SlideSpec

    root = ensure_data_env()
    folder = root / "her2st" / section
    adata = datasets.her2st(section)
    spec = SlideSpec(
        name=section,
        format="st",
        counts=str(folder / "counts.tsv.gz"),
        spots=str(folder / "spots.tsv"),
        image=str(folder / "he.jpg"),
        library_id=section,
    )
    return Section(section, adata, spec)


def choose_genes(train: dict[str, object], n_genes: int) -> list[str]:
    """The ``n_genes`` most variable genes of the training sections only."""
    from domains_dlpfc import choose_panel

    return choose_panel(train, n_genes)


# ----------------------------------------------------------------------------- scoring
def pearson_per_gene(y: np.ndarray, yhat: np.ndarray) -> np.ndarray:
    """Pearson r of every column; NaN where the truth or the prediction is constant."""
    y = np.asarray(y, dtype=np.float64)
    yhat = np.asarray(yhat, dtype=np.float64)
    yc = y - y.mean(0)
    pc = yhat - yhat.mean(0)
    den = np.sqrt((yc**2).sum(0) * (pc**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (yc * pc).sum(0) / den
    r[~(den > 1e-12)] = np.nan
    return r


def score(y: np.ndarray, yhat: np.ndarray, genes: Sequence[str]) -> dict:
    r = pearson_per_gene(y, yhat)
    ok = np.isfinite(r)
    return {
        "pearson": float(np.mean(r[ok])) if ok.any() else float("nan"),
        "n_genes_scored": int(ok.sum()),
        "n_genes_r_gt_0.3": int((r[ok] > R_GOOD).sum()),
        "per_gene": {g: (float(v) if np.isfinite(v) else None) for g, v in zip(genes, r)},
    }


def _ridge_fit(z: np.ndarray, y: np.ndarray, alphas: Sequence[float]):
    """Ridge solutions (with intercept) for every penalty, from one SVD: the same solver as
    tissuegraph's probe. Returns a list of ``(coef [D, G], intercept [G])``, one per alpha."""
    from tissuegraph.train.probe import _ridge_path

    return _ridge_path(z, y, alphas)


class Probe:
    """HEST-style linear probe: standardise -> PCA(<= 256) -> ridge, fitted on training only.

    The ridge penalty is chosen among ``alphas`` by cross-validation across the training
    sections (``groups``: leave one training section out, mean squared error), so that nothing
    of the held-out section is used.
    """

    def __init__(self, n_pcs: int = 256, alphas: Sequence[float] = tuple(np.logspace(-2, 5, 15))):
        self.n_pcs = n_pcs
        self.alphas = list(alphas)

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> Probe:
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        groups = np.asarray(groups)
        self.scaler_ = StandardScaler().fit(x)
        xs = self.scaler_.transform(x)
        n = int(min(self.n_pcs, xs.shape[1], xs.shape[0] - 1))
        self.pca_ = PCA(n_components=n, random_state=0).fit(xs)
        z = self.pca_.transform(xs)
        uniq = np.unique(groups)
        if len(uniq) > 1:
            err = np.zeros(len(self.alphas))
            for g in uniq:
                tr, te = groups != g, groups == g
                for i, (coef, b) in enumerate(_ridge_fit(z[tr], y[tr], self.alphas)):
                    err[i] += np.mean((z[te] @ coef + b - y[te]) ** 2)
            self.alpha_ = float(self.alphas[int(np.argmin(err))])
            self.cv_mse_ = (err / len(uniq)).tolist()
        else:
            self.alpha_ = float(np.median(self.alphas))
        self.coef_, self.intercept_ = _ridge_fit(z, y, [self.alpha_])[0]
        self.n_components_ = n
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = self.pca_.transform(self.scaler_.transform(np.asarray(x, dtype=np.float64)))
        return z @ self.coef_ + self.intercept_


# ----------------------------------------------------------------------------- features
def squidpy_image_features(section: Section, features: Sequence[str]) -> np.ndarray:
    """Colour / texture features of each spot's image crop (squidpy), ``[N, F]``."""
    import squidpy as sq
    from anndata import AnnData
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    ad = section.adata
    lib = section.name
    path = (ad.uns.get("tissuegraph") or {}).get("image_path")
    if path:
        img = np.asarray(Image.open(path).convert("RGB"))
        scale = 1.0
    else:  # in-memory image at a scale factor
        sp = ad.uns["spatial"][next(iter(ad.uns["spatial"]))]
        key = "hires" if "hires" in sp["images"] else "lowres"
        img = np.asarray(sp["images"][key])
        scale = float(sp["scalefactors"][f"tissue_{key}_scalef"])
    tg = ad.uns.get("tissuegraph") or {}
    diam_px = float(tg.get("spot_diameter_um", 100.0)) / float(tg["microns_per_pixel"])
    tmp = AnnData(obs=ad.obs[[]].copy())
    tmp.obsm["spatial"] = np.asarray(ad.obsm["spatial"], dtype=np.float64) * scale
    tmp.uns["spatial"] = {
        lib: {"scalefactors": {"spot_diameter_fullres": diam_px * scale}, "images": {}}
    }
    ic = sq.im.ImageContainer(img, layer="image", library_id=lib)
    sq.im.calculate_image_features(
        tmp,
        ic,
        layer="image",
        library_id=lib,
        features=list(features),
        key_added="img_features",
        n_jobs=1,
        show_progress_bar=False,
    )
    df = tmp.obsm["img_features"]
    return np.asarray(df.to_numpy(), dtype=np.float64)


def spot_crops(section: Section, size_um: float = CROP_UM, px: int = CROP_PX) -> np.ndarray:
    """uint8 ``[N, 3, px, px]`` crops of ``size_um`` centred on the section's spots."""
    from tissuegraph import io
    from tissuegraph.graph.patches import crop_patches

    ad = section.adata
    mpp = float(ad.uns["tissuegraph"]["microns_per_pixel"])
    with io.open_image(ad) as image:
        return crop_patches(image, np.asarray(ad.obsm["spatial"]), size_um / mpp, px)


def colour_features(crops: np.ndarray) -> np.ndarray:
    """Mean / sd of R, G, B, H, S, V of each crop ``[N, 3, S, S]`` -> ``[N, 12]``."""
    from tissuegraph.graph.patches import colour_statistics

    return colour_statistics(crops.transpose(0, 2, 3, 1))


def backbone_features(crops: np.ndarray, name: str, checkpoint_path: str | None) -> np.ndarray:
    """Features of the frozen backbone (seeded random init, or ``checkpoint_path``), the
    network and preprocessing the build uses: ``[N, F]``."""
    import torch

    from tissuegraph.graph.config import EncoderSpec
    from tissuegraph.graph.patches import load_encoder

    model, mean, std = load_encoder(EncoderSpec(name=name, checkpoint_path=checkpoint_path))
    m = torch.tensor(mean).view(1, 3, 1, 1)
    sd = torch.tensor(std).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for i in range(0, len(crops), 64):
            x = torch.from_numpy(np.ascontiguousarray(crops[i : i + 64])).float() / 255.0
            out.append(model((x - m) / sd).float().numpy())
    return np.concatenate(out)


def image_only(adata):
    """A copy of the section whose counts are all zero: only its image and positions remain."""
    import scipy.sparse as sp

    out = adata.copy()
    out.X = sp.csr_matrix(out.shape, dtype=np.float32)
    for layer in list(out.layers):
        del out.layers[layer]
    return out


def _order(var_names, genes):
    idx = {str(g).upper(): i for i, g in enumerate(var_names)}
    missing = [g for g in genes if str(g).upper() not in idx]
    if missing:
        raise RuntimeError(f"prediction lacks panel genes {missing[:5]}")
    return [idx[str(g).upper()] for g in genes]


def _dense(x):
    return x.toarray() if hasattr(x, "toarray") else np.asarray(x)


def predict_tissuegraph(
    section: Section, ckpt: Path, genes: Sequence[str], device: str, method: str
) -> np.ndarray:
    """``tl.predict_expression(method=...)`` on the held-out section with its counts zeroed."""
    adata = image_only(section.adata)
    from tissuegraph import tl

    pred = tl.predict_expression(
        adata, str(ckpt), device=device, use_expression=False, method=method
    )
    return np.asarray(_dense(pred[:, _order(pred.var_names, genes)].X))


def pretrained_embedding(section: Section, ckpt: Path) -> np.ndarray:
    """The pretrained model's image-side embedding of every spot (expression hidden)."""
    from tissuegraph.graph.pipeline import build_slide_graph
    from tissuegraph.train.checkpoint import load
    from tissuegraph.train.infer import image_only_embedding

    ck = load(ckpt, device="cpu")
    graph = build_slide_graph(
        image_only(section.adata),
        ck.build_config,
        genes=ck.genes,
        slide_name=section.name,
    )
    return image_only_embedding(ck.model, graph, device="cpu")


# ----------------------------------------------------------------------------- one fold
def _cached(cache: dict, key, fn):
    if key not in cache:
        cache[key] = fn()
    return cache[key]


def run_fold(
    held: Section, train: list[Section], s: Settings, workdir: Path, cache: dict
) -> list[dict]:
    names = [t.name for t in train]
    genes = choose_genes({t.name: t.adata for t in train}, s.n_genes)
    y_tr = np.concatenate([log_expression(t.adata, genes) for t in train])
    groups = np.concatenate([np.full(t.adata.n_obs, i) for i, t in enumerate(train)])
    y_te = log_expression(held.adata, genes)
    base = {
        "held_out": held.name,
        "train": names,
        "n_genes": len(genes),
        "n_test_spots": int(held.adata.n_obs),
        "n_train_spots": int(len(y_tr)),
    }
    runs = []

    def add(method, yhat, genes_=genes, y=y_te, **extra):
        rec = {**base, "method": method, **score(y, yhat, genes_), **extra}
        runs.append(rec)
        print(
            f"  held-out {held.name} {method:<20} Pearson {rec['pearson']:.3f} "
            f"({rec['n_genes_r_gt_0.3']} genes r>0.3, {rec['n_genes_scored']} scored)",
            flush=True,
        )

    def probe_on(method, feats, **extra):
        with measure() as m:
            x_tr = np.concatenate([feats(t) for t in train])
            probe = Probe(s.n_pcs).fit(x_tr, y_tr, groups)
            yhat = probe.predict(feats(held))
        add(
            method,
            yhat,
            n_features=int(x_tr.shape[1]),
            alpha=probe.alpha_,
            seconds=m.seconds,
            **extra,
        )

    crops = lambda sec: _cached(cache, ("crops", sec.name), lambda: spot_crops(sec, px=s.crop_px))  # noqa: E731
    if "colour_stats" in s.methods:
        probe_on(
            "colour_stats",
            lambda sec: colour_features(crops(sec)),
            crop_um=CROP_UM,
            crop_px=s.crop_px,
        )
    if "backbone_untrained" in s.methods:
        probe_on(
            "backbone_untrained",
            lambda sec: _cached(
                cache,
                ("backbone", sec.name),
                lambda: backbone_features(crops(sec), s.backbone, s.checkpoint_path),
            ),
            backbone=s.backbone,
            crop_um=CROP_UM,
            crop_px=s.crop_px,
        )
    if "squidpy_features" in s.methods:
        probe_on(
            "squidpy_features",
            lambda sec: _cached(
                cache,
                ("squidpy", sec.name),
                lambda: squidpy_image_features(sec, s.squidpy_features),
            ),
        )

    needs_tg = {*TISSUEGRAPH, "backbone_pretrained"} & set(s.methods)
    if not needs_tg:
        return runs
    graphs = workdir / f"graphs_heldout_{held.name}"
    build_ov = [
        f"patches.encoder.name={s.backbone}",
        f"patches.encoder.input_px={s.crop_px}",
        f"patches.crop_px={s.crop_px}",
        *s.build_overrides,
    ]
    if s.checkpoint_path:
        build_ov.append(f"patches.encoder.checkpoint_path={s.checkpoint_path}")
    with measure() as mb:
        manifest = build_graph_dir(
            [t.spec for t in train],
            graphs,
            n_top=s.n_genes,
            fit_slides=names,
            overrides=build_ov,
            config=BUILD_CONFIG,
        )
    check_training_slides(graphs, names, [held.name])
    with measure() as mt:
        last = pretrain_checkpoint(
            graphs,
            workdir / f"run_{held.name}",
            steps=s.steps,
            seed=s.seed,
            device=s.device,
            overrides=["train.threads=1", *s.pretrain_overrides],
            config=PRETRAIN_CONFIG,
        )
    best = last.parent / "best.pt"
    ckpt = best if best.is_file() else last
    check_checkpoint_slides(ckpt, names, [held.name])
    from tissuegraph.train.checkpoint import load

    step = load(ckpt, model=False).step
    base.update(
        panel_equals_probe_genes=list(manifest["genes"]) == list(genes),
        build_s=mb.seconds,
        pretrain_s=mt.seconds,
        steps=s.steps,
        checkpoint=ckpt.name,
        checkpoint_step=step,
    )
    genes_tg = list(manifest["genes"])
    if genes_tg != list(genes):
        base["note"] = (
            "graph panel differs from the probe genes; tissuegraph scored on the graph panel"
        )
    y_te_tg = log_expression(held.adata, genes_tg)
    for method in TISSUEGRAPH:
        if method not in s.methods:
            continue
        with measure() as m:
            yhat = predict_tissuegraph(held, ckpt, genes_tg, s.device, method.split("_", 1)[1])
        add(method, yhat, genes_tg, y_te_tg, seconds=m.seconds)
    if "backbone_pretrained" in s.methods:
        probe_on("backbone_pretrained", lambda sec: pretrained_embedding(sec, ckpt))
    return runs


# ----------------------------------------------------------------------------- main
def fold_plan(folds: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``(held-out, training sections)``: a C section is predicted from the other three C
    sections (leave-one-section-out within patient C); B4 from C2-C5."""
    plan = []
    for f in folds:
        if f == "B4":
            plan.append((f, list(C_SECTIONS)))
        else:
            plan.append((f, [c for c in C_SECTIONS if c != f]))
    return plan


def summarise(runs: list[dict], s: Settings):
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    folds = [f for f in (*C_SECTIONS, "B4") if any(r["held_out"] == f for r in runs)]
    cfolds = [f for f in folds if f in C_SECTIONS]
    cols = [
        "method",
        "mean r (C folds)",
        *[f"{f}: r / #r>0.3" for f in folds],
    ]
    by = {(r["method"], r["held_out"]): r for r in runs}
    rows = []
    for m in methods:
        cvals = [by[(m, f)]["pearson"] for f in cfolds if (m, f) in by]
        cells = []
        for f in folds:
            r = by.get((m, f))
            cells.append(f"{r['pearson']:.3f} / {r['n_genes_r_gt_0.3']}" if r else "")
        rows.append([m, fmt_mean_sd(cvals) if cvals else "", *cells])

    def cmean(m):
        v = [by[(m, f)]["pearson"] for f in cfolds if (m, f) in by]
        return float(np.mean(v)) if v else None

    default = "tissuegraph_probe"
    targets = []
    col = cmean("colour_stats")
    worst = None
    per = []
    for f in cfolds:
        a, b = by.get((default, f)), by.get(("colour_stats", f))
        if a and b and b["pearson"] > 0:
            ratio = a["pearson"] / b["pearson"]
            per.append(f"{f} {ratio:.2f}x")
            worst = ratio if worst is None else min(worst, ratio)
    targets.append(
        Target(
            "tl.predict_expression / colour-statistics ridge, worst patient-C fold",
            worst,
            TARGET_RATIO,
            unit="x",
            context=", ".join(per),
        )
    )
    targets.append(
        Target(
            "tl.predict_expression mean Pearson over the patient-C folds",
            cmean(default),
            TARGET_MEAN,
            context=f"colour-statistics ridge: {col:.3f}" if col is not None else "",
        )
    )
    bu = cmean("backbone_untrained")
    tg = cmean(default)
    targets.append(
        Target(
            "tl.predict_expression / probe on the untrained backbone (C folds)",
            tg / bu if tg is not None and bu else None,
            1.0,
            unit="x",
            context=f"untrained backbone probe: {bu:.3f}" if bu is not None else "",
        )
    )
    return cols, rows, targets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one fold (held-out C2), fewer steps")
    p.add_argument("--folds", nargs="+", default=None, help="held-out sections (default: all)")
    p.add_argument("--n-genes", type=int, default=50)
    p.add_argument(
        "--steps", type=int, default=None, help="pretraining steps (default 400; quick 60)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default="resnet10t", help="timm model name or hf-hub: id")
    p.add_argument("--checkpoint-path", default=None, help="backbone weights file")
    p.add_argument("--crop-px", type=int, default=CROP_PX, help="crop pixels (all methods)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--build-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    set_threads(a.threads)
    s = Settings(
        n_genes=a.n_genes,
        steps=a.steps if a.steps is not None else (60 if a.quick else FULL_STEPS),
        seed=a.seed,
        folds=a.folds or (["C2"] if a.quick else [*C_SECTIONS, "B4"]),
        backbone=a.backbone,
        checkpoint_path=a.checkpoint_path,
        crop_px=a.crop_px,
        methods=list(a.methods),
        device=a.device,
        pretrain_overrides=list(a.pretrain_override),
        build_overrides=list(a.build_override),
    )
    t0 = time.perf_counter()
    sections = {n: load_her2st(n) for n in SECTIONS}
    tmp = None
    if a.workdir:
        workdir = Path(a.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="tg_bench_her2st_")
        workdir = Path(tmp)
    runs: list[dict] = []
    cache: dict = {}
    try:
        for held, train in fold_plan(s.folds):
            runs += run_fold(sections[held], [sections[n] for n in train], s, workdir, cache)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    cols, rows, targets = summarise(runs, s)
    notes = [
        "folds: each patient-C section predicted from the other three C sections; B4 "
        "(patient B) from C2-C5, shown apart and not in the C means",
        "genes (50 most variable) and all probe statistics (scaling, PCA, ridge penalty) "
        "fitted on the training sections only; the held-out section's counts are zeroed "
        "before tissuegraph predicts",
        "tissuegraph uses checkpoints/best.pt (the step with the lowest held-out "
        "image_expression loss on windows of the training sections)",
        "backbone: random-init resnet10t (no pretrained weights offline), 112 px crops; "
        "tissuegraph's features standardise each slide's features (a stain normalisation "
        "from the slide's own image); the baselines use raw features",
    ]
    return finish(
        results_path(NAME, a.quick, a.out),
        benchmark=NAME,
        title=TITLE,
        quick=a.quick,
        params={**asdict(s), "elapsed_s": time.perf_counter() - t0},
        extra=None
        if a.quick or (s.steps >= FULL_STEPS and set(s.folds) == {*C_SECTIONS, "B4"})
        else {"mode": "reduced"},
        runs=runs,
        table=(cols, rows),
        targets=targets,
        notes=notes,
    )


if __name__ == "__main__":
    main()
