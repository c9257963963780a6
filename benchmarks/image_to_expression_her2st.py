"""Image -> expression on HER2ST: leave-one-section-out, prediction from H&E alone.

Sections B4, C2, C3, C4, C5 (legacy ST, 100 µm spots). For each fold one section is held
out; the genes are the 50 most variable genes chosen on the training sections only, the
target is their log1p(CP10k) expression, and the score is the Pearson correlation between
predicted and measured expression on the held-out spots, per gene, averaged over the
genes (genes constant in the held-out section are left out and counted), then over folds.

Methods
-------
``tissuegraph``
    ``build_graphs`` of the training sections (panel fitted on them only) -> ``pretrain``
    -> ``tl.predict_expression`` on the held-out section, whose expression is removed
    before prediction (its counts are zeroed), so only its image is used.
``backbone (before)`` / ``backbone (after)``
    The HEST-style linear probe on image embeddings of the same timm backbone: first as
    created (random init, or the weights of ``--checkpoint-path``), then the backbone taken
    out of the tissuegraph model after pretraining. Both embed the same patch crops (the
    ``patch_0`` pixels of the graphs) with the same preprocessing.
``squidpy features``
    The same probe on colour / texture features of the spot's image
    (``squidpy.im.calculate_image_features``: ``summary``, ``texture``, ``histogram``).

The probe (fitted on the training sections only): standardise, PCA to 256 components (or
fewer when there are fewer features or spots), ridge regression with the penalty chosen by
leave-one-training-section-out cross-validation.

Backbones: ``--backbone`` takes any timm model name. To reproduce with foundation-model
weights, download them once and point ``--checkpoint-path`` at the file, e.g. UNI
(``--backbone vit_large_patch16_224 --checkpoint-path pytorch_model.bin``, from the
``hf-hub:MahmoodLab/UNI`` repository) or Virchow (``hf-hub:paige-ai/Virchow``); timm hub ids
(``hf-hub:...``) are accepted as ``--backbone`` where the network is available.

Run ``uv run --group bench python benchmarks/image_to_expression_her2st.py [--quick]``.
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
    Target,
    build_graph_dir,
    check_training_slides,
    ensure_data_env,
    finish,
    fmt_mean_sd,
    mean_sd,
    measure,
    pretrain_checkpoint,
    results_path,
    set_threads,
)
from domains_dlpfc import check_checkpoint_slides, log_expression  # noqa: E402

NAME = "image_to_expression_her2st"
TITLE = "Image -> expression on HER2ST (leave-one-section-out, Pearson per gene)"
SECTIONS = ("B4", "C2", "C3", "C4", "C5")
METHODS = ("tissuegraph", "backbone_before", "backbone_after", "squidpy_features")
TARGET_RATIO = 1.3
FULL_STEPS = 400
#: build options for legacy ST (100 µm spots on a 200 µm grid), as configs/build/her2st.yaml
ST_BUILD = ["patches.sizes_um=[200,600,1800]"]


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
    backbone: str | None = None
    checkpoint_path: str | None = None
    crop_px: int | None = None
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
        "per_gene": {g: (float(v) if np.isfinite(v) else None) for g, v in zip(genes, r)},
    }


def _ridge_fit(z: np.ndarray, y: np.ndarray, alphas: Sequence[float]):
    """Ridge solutions (with intercept) for every penalty, from one SVD.

    Returns a list of ``(coef [D, G], intercept [G])``, one per alpha.
    """
    zm, ym = z.mean(0), y.mean(0)
    u, sv, vt = np.linalg.svd(z - zm, full_matrices=False)
    uty = u.T @ (y - ym)
    out = []
    for a in alphas:
        coef = vt.T @ ((sv / (sv**2 + a))[:, None] * uty)
        out.append((coef, ym - zm @ coef))
    return out


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


def patch_crops(graph) -> np.ndarray:
    """``patch_0`` pixels of a graph (row ``i`` = spot ``i``): uint8 ``[N, 3, S, S]``."""
    from tissuegraph.graph import schema

    store = graph[schema.patch(0)]
    if schema.IMG not in store:
        raise RuntimeError(
            "the graphs hold frozen features, not pixels: build with patches.encoder.name=null"
        )
    return store[schema.IMG].cpu().numpy()


def find_image_encoder(model):
    """The image encoder inside a tissuegraph model (``tissuegraph.nn.encoders.ImageEncoder``:
    a timm backbone with its own input normalisation)."""
    from tissuegraph.nn.encoders import ImageEncoder

    for mod in model.modules():
        if isinstance(mod, ImageEncoder):
            return mod
    raise RuntimeError(
        "the model has no image encoder on pixels (graphs built with frozen features?)"
    )


def fresh_image_encoder(trained, name: str, checkpoint_path: str | None, seed: int = 0):
    """The same image encoder before tissuegraph pretraining: random init (seeded) or the
    weights of ``checkpoint_path``, with the trained one's input size."""
    import torch

    from tissuegraph.nn.encoders import ImageEncoder

    torch.manual_seed(seed)
    return ImageEncoder(
        name,
        trained.proj.out_features,
        trained.scale_emb.num_embeddings,
        pretrained=False,
        checkpoint_path=checkpoint_path,
        input_px=trained.input_px,
    ).eval()


def encoder_embed(encoder, crops: np.ndarray, *, batch: int = 128) -> np.ndarray:
    """Backbone features (before tissuegraph's projection) of uint8 crops ``[N, 3, S, S]``,
    with the encoder's own normalisation and resizing: ``[N, F]``."""
    import torch

    encoder = encoder.eval()
    out = []
    with torch.no_grad():
        for i in range(0, crops.shape[0], batch):
            f = encoder.features(torch.from_numpy(np.ascontiguousarray(crops[i : i + batch])))
            out.append(f.float().cpu().numpy())
    return np.concatenate(out, 0)


# ----------------------------------------------------------------------------- tissuegraph
def predict_tissuegraph(
    section: Section, ckpt: Path, genes: Sequence[str], device: str
) -> np.ndarray:
    """``tl.predict_expression`` on the held-out section with its expression removed."""
    from tissuegraph import tl

    adata = image_only(section.adata)
    pred = tl.predict_expression(adata, str(ckpt), device=device, use_expression=False)
    return np.asarray(_dense(pred[:, _order(pred.var_names, genes)].X))


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


def section_graph(section: Section, ckpt: Path, genes: Sequence[str]):
    """The held-out section's graph built with the checkpoint's build options and panel."""
    from tissuegraph.graph.pipeline import build_slide_graph
    from tissuegraph.train.checkpoint import load_model

    _, info = load_model(ckpt, device="cpu")
    return build_slide_graph(
        image_only(section.adata),
        info["build_config"],
        genes=list(info["genes"]),
        slide_name=section.name,
    )


# ----------------------------------------------------------------------------- one fold
def run_fold(
    held: Section, train: list[Section], s: Settings, workdir: Path, cache: dict
) -> list[dict]:
    from tissuegraph.graph.storage import load_graph
    from tissuegraph.train.checkpoint import load_model

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
    }
    runs = []

    def add(method, yhat, **extra):
        rec = {**base, "method": method, **score(y_te, yhat, genes), **extra}
        runs.append(rec)
        print(
            f"  held-out {held.name} {method:<18} Pearson {rec['pearson']:.3f} ({rec['n_genes_scored']} genes)",
            flush=True,
        )

    if "squidpy_features" in s.methods:
        with measure() as m:
            for sec in [*train, held]:
                if sec.name not in cache:
                    cache[sec.name] = squidpy_image_features(sec, s.squidpy_features)
            x_tr = np.concatenate([cache[t.name] for t in train])
            probe = Probe(s.n_pcs).fit(x_tr, y_tr, groups)
            yhat = probe.predict(cache[held.name])
        add(
            "squidpy_features",
            yhat,
            n_features=int(x_tr.shape[1]),
            alpha=probe.alpha_,
            seconds=m.seconds,
        )

    needs_tg = {"tissuegraph", "backbone_before", "backbone_after"} & set(s.methods)
    if not needs_tg:
        return runs
    graphs = workdir / f"graphs_heldout_{held.name}"
    build_ov = list(s.build_overrides)
    if s.crop_px:
        build_ov.append(f"patches.crop_px={s.crop_px}")
    with measure() as mb:
        manifest = build_graph_dir(
            [t.spec for t in train], graphs, n_top=s.n_genes, fit_slides=names, overrides=build_ov
        )
    check_training_slides(graphs, names, [held.name])
    pre_ov = list(s.pretrain_overrides)
    if s.backbone:
        pre_ov.append(f"model.image_encoder.name={s.backbone}")
    if s.checkpoint_path:
        pre_ov.append(f"model.image_encoder.checkpoint_path={s.checkpoint_path}")
    with measure() as mt:
        ckpt = pretrain_checkpoint(
            graphs,
            workdir / f"run_{held.name}",
            steps=s.steps,
            seed=s.seed,
            device=s.device,
            overrides=pre_ov,
        )
    check_checkpoint_slides(ckpt, names, [held.name])
    base.update(
        panel_equals_probe_genes=list(manifest["genes"]) == list(genes),
        build_s=mb.seconds,
        pretrain_s=mt.seconds,
        steps=s.steps,
    )
    if list(manifest["genes"]) != list(genes):
        genes_tg = list(manifest["genes"])
        base["note"] = (
            "graph panel differs from the probe genes; tissuegraph scored on the graph panel"
        )
    else:
        genes_tg = genes

    if "tissuegraph" in s.methods:
        with measure() as m:
            yhat = predict_tissuegraph(held, ckpt, genes_tg, s.device)
        y_te_tg = log_expression(held.adata, genes_tg)
        rec = {
            **base,
            "method": "tissuegraph",
            **score(y_te_tg, yhat, genes_tg),
            "seconds": m.seconds,
        }
        runs.append(rec)
        print(f"  held-out {held.name} tissuegraph        Pearson {rec['pearson']:.3f}", flush=True)

    if {"backbone_before", "backbone_after"} & set(s.methods):
        model, info = load_model(ckpt, device="cpu")
        after = find_image_encoder(model)
        name = s.backbone or _backbone_name(info)
        by = {sl["name"]: patch_crops(load_graph(graphs / sl["file"])) for sl in manifest["slides"]}
        crops_tr = np.concatenate([by[n] for n in names])  # the probe's row order
        crops_te = patch_crops(section_graph(held, ckpt, genes_tg))
        before = fresh_image_encoder(after, name, s.checkpoint_path, s.seed)
        for method, enc in (("backbone_before", before), ("backbone_after", after)):
            if method not in s.methods:
                continue
            with measure() as m:
                f_tr = encoder_embed(enc, crops_tr)
                f_te = encoder_embed(enc, crops_te)
                probe = Probe(s.n_pcs).fit(f_tr, y_tr, groups)
                yhat = probe.predict(f_te)
            add(
                method,
                yhat,
                backbone=name,
                n_features=int(f_tr.shape[1]),
                alpha=probe.alpha_,
                crop_px=int(crops_te.shape[-1]),
                seconds=m.seconds,
            )
    return runs


def _backbone_name(info) -> str:
    """The timm name of the checkpoint's image backbone (from its stored config)."""
    cfg = info.get("config") or {}
    model = cfg.get("model") or {}
    name = (model.get("image_encoder") or {}).get("name")
    if not name:
        raise RuntimeError(
            "cannot tell the backbone's timm name from the checkpoint: pass --backbone"
        )
    return str(name)


# ----------------------------------------------------------------------------- main
def summarise(runs: list[dict], s: Settings):
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    folds = sorted({r["held_out"] for r in runs})
    cols = [
        "method",
        f"Pearson (mean ± sd over {len(folds)} fold(s))",
        *[f"held-out {f}" for f in folds],
    ]
    rows = []
    means = {}
    for m in methods:
        rs = {r["held_out"]: r["pearson"] for r in runs if r["method"] == m}
        means[m] = mean_sd(list(rs.values()))[0]
        rows.append([m, fmt_mean_sd(list(rs.values())), *[rs.get(f) for f in folds]])
    before = means.get("backbone_before")

    def ratio(m):
        v = means.get(m)
        if v is None or before is None or not np.isfinite(before) or before <= 0:
            return None
        return v / before

    targets = [
        Target(
            "backbone after / before tissuegraph pretraining (same probe)",
            ratio("backbone_after"),
            TARGET_RATIO,
            unit="x",
            context=f"backbone before: {before:.3f}" if before is not None else "",
        ),
        Target(
            "tl.predict_expression / backbone before pretraining (probe)",
            ratio("tissuegraph"),
            TARGET_RATIO,
            unit="x",
            context="tissuegraph's own head vs the probe on the untrained backbone",
        ),
    ]
    return cols, rows, targets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one fold (held-out C2), fewer steps")
    p.add_argument("--folds", nargs="+", default=None, help="held-out sections (default: all)")
    p.add_argument("--n-genes", type=int, default=50)
    p.add_argument(
        "--steps", type=int, default=None, help="pretraining steps (default 400; quick 40)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default=None, help="timm model name or hf-hub: id")
    p.add_argument("--checkpoint-path", default=None, help="backbone weights file")
    p.add_argument("--crop-px", type=int, default=None, help="patch_0 pixels (build option)")
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
        steps=a.steps if a.steps is not None else (40 if a.quick else FULL_STEPS),
        seed=a.seed,
        folds=a.folds or (["C2"] if a.quick else list(SECTIONS)),
        backbone=a.backbone,
        checkpoint_path=a.checkpoint_path,
        crop_px=a.crop_px,
        methods=list(a.methods),
        device=a.device,
        pretrain_overrides=list(a.pretrain_override),
        build_overrides=ST_BUILD + list(a.build_override),
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
        for held in s.folds:
            train = [sections[n] for n in SECTIONS if n != held]
            runs += run_fold(sections[held], train, s, workdir, cache)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    cols, rows, targets = summarise(runs, s)
    notes = [
        "genes and all probe statistics (scaling, PCA, ridge penalty) fitted on the training "
        "sections only; the held-out section's counts are zeroed before tissuegraph predicts",
    ]
    return finish(
        results_path(NAME, a.quick, a.out),
        benchmark=NAME,
        title=TITLE,
        quick=a.quick,
        params={**asdict(s), "elapsed_s": time.perf_counter() - t0},
        extra=None
        if a.quick or (s.steps >= FULL_STEPS and set(s.folds) == set(SECTIONS))
        else {"mode": "reduced"},
        runs=runs,
        table=(cols, rows),
        targets=targets,
        notes=notes,
    )


if __name__ == "__main__":
    main()
