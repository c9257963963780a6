"""Plots of what :mod:`tissuegraph.tl` wrote (matplotlib; every function returns the figure
or axes and saves to ``save=`` as PNG/PDF/SVG when given)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tissuegraph import _layout as L
from tissuegraph._utils import atomic_path
from tissuegraph.errors import InputError
from tissuegraph.tl._core import category_colors, default_palette

NICHE_KEY = "tg_niche"


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg") and not os.environ.get(
        "DISPLAY"
    ):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def savefig(fig, save: str | os.PathLike | None, dpi: int = 150) -> None:
    """Write ``fig`` atomically to ``save`` (format from the suffix; default PNG)."""
    if save is None:
        return
    path = Path(save)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt not in ("png", "pdf", "svg", "jpg", "jpeg"):
        raise InputError(f"save={path}: use a .png, .pdf or .svg path")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")


def palette(n: int) -> list[str]:
    """``n`` distinguishable colours (tab10, tab20, then a hue wheel), as hex strings."""
    return default_palette(n)


def _library(adata, library_id):
    spatial = adata.uns.get(L.SPATIAL) or {}
    if library_id is None:
        library_id = (adata.uns.get(L.TISSUEGRAPH) or {}).get(L.LIBRARY_ID)
        if library_id not in spatial:
            library_id = next(iter(spatial), None)
    return library_id, spatial.get(library_id, {}) if library_id is not None else {}


def background(adata, library_id: str | None = None, max_side: int = 1200):
    """``(image or None, scale)``: the slide image to draw under spots and the factor that
    maps ``obsm['spatial']`` (full-res px) onto it."""
    _, lib = _library(adata, library_id)
    images = lib.get("images") or {}
    sf = lib.get("scalefactors") or {}
    for key in ("hires", "lowres"):
        img = images.get(key)
        s = sf.get(f"tissue_{key}_scalef")
        if img is not None and s:
            img = np.asarray(img)
            if max(img.shape[:2]) > max_side:  # thin out a large in-memory image
                step = int(np.ceil(max(img.shape[:2]) / max_side))
                return img[::step, ::step], float(s) / step
            return img, float(s)
    path = (adata.uns.get(L.TISSUEGRAPH) or {}).get(L.IMAGE_PATH)
    if path and Path(path).is_file():
        from tissuegraph.io import open_image

        with open_image(adata) as im:
            thumb, scale = im.thumbnail(max_side)
        return thumb, float(scale)
    return None, 1.0


def _spot_diameter_px(adata, library_id) -> float | None:
    _, lib = _library(adata, library_id)
    d = (lib.get("scalefactors") or {}).get("spot_diameter_fullres")
    return float(d) if d else None


def spatial_scatter(
    adata,
    color: str,
    *,
    library_id: str | None = None,
    image: bool = True,
    ax=None,
    spot_scale: float = 1.0,
    cmap: str = "viridis",
    title: str | None = None,
    legend: bool = True,
    alpha: float = 0.9,
    values: np.ndarray | None = None,
    save=None,
):
    """Spots coloured by an obs column (categorical or numeric) or a gene, over the image.

    Spots are drawn as discs of their physical diameter (``spot_diameter_fullres``).
    Categories take their colours from ``uns[f"{color}_colors"]`` (scanpy's convention,
    also read by ``sc.pl.spatial``); when that is missing or too short the default palette
    is written there first, so both libraries draw each category in the same colour.

    Returns
    -------
    The matplotlib ``Axes``.
    """
    plt = _plt()
    from matplotlib.collections import EllipseCollection

    if L.SPATIAL not in adata.obsm:
        raise InputError("pl: obsm['spatial'] not found: read the slide with tissuegraph.io")
    xy = np.asarray(adata.obsm[L.SPATIAL], dtype=np.float64)
    img, scale = background(adata, library_id) if image else (None, 1.0)
    if img is None:
        scale = 1.0
    pts = xy * scale
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 6))
    fig = ax.figure
    if img is not None:
        ax.imshow(img)
    diam = _spot_diameter_px(adata, library_id)
    if diam is None:
        from sklearn.neighbors import NearestNeighbors

        d, _ = NearestNeighbors(n_neighbors=2).fit(xy).kneighbors(xy)
        diam = 0.55 * float(np.median(d[:, 1])) / 0.5 if len(xy) > 1 else 10.0
        diam = float(np.median(d[:, 1])) * 0.9 if len(xy) > 1 else 10.0
    w = np.full(len(pts), diam * scale * spot_scale)
    handles = None
    if values is not None:
        vals = np.asarray(values, dtype=np.float64)
        cats = None
    elif color in adata.obs:
        s = adata.obs[color]
        if isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object or s.dtype == bool:
            s = s.astype("category")
            cats = [str(c) for c in s.cat.categories]
            codes = s.cat.codes.to_numpy()
        else:
            vals = s.to_numpy(dtype=np.float64)
            cats = None
    elif color in adata.var_names:
        x = adata[:, color].X
        vals = np.asarray(x.toarray() if hasattr(x, "toarray") else x).ravel().astype(float)
        cats = None
    else:
        raise InputError(f"pl: {color!r} is neither an obs column nor a gene")
    if values is None and cats is not None:
        cols = category_colors(adata, color, write=not adata.is_view)
        from matplotlib.colors import to_rgba

        rgba = np.array([to_rgba(c) for c in cols] + [(0.8, 0.8, 0.8, 1.0)])  # last: no label
        facecolors = rgba[np.where(codes >= 0, codes, len(cols))]
        from matplotlib.patches import Patch

        handles = [Patch(color=cols[i], label=c) for i, c in enumerate(cats)]
        coll = EllipseCollection(
            w, w, np.zeros_like(w), units="xy", offsets=pts, offset_transform=ax.transData
        )
        coll.set_facecolor(facecolors)
    else:
        coll = EllipseCollection(
            w, w, np.zeros_like(w), units="xy", offsets=pts, offset_transform=ax.transData
        )
        coll.set_array(vals)
        coll.set_cmap(cmap)
        fig.colorbar(coll, ax=ax, fraction=0.04, pad=0.01)
    coll.set_alpha(alpha)
    coll.set_linewidth(0)
    ax.add_collection(coll)
    pad = diam * scale
    if img is None:
        ax.set_xlim(pts[:, 0].min() - pad, pts[:, 0].max() + pad)
        ax.set_ylim(pts[:, 1].max() + pad, pts[:, 1].min() - pad)
    else:
        ax.set_xlim(max(pts[:, 0].min() - 4 * pad, 0), min(pts[:, 0].max() + 4 * pad, img.shape[1]))
        ax.set_ylim(min(pts[:, 1].max() + 4 * pad, img.shape[0]), max(pts[:, 1].min() - 4 * pad, 0))
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else color)
    if legend and handles:
        ax.legend(
            handles=handles,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            frameon=False,
            fontsize=8,
            title=color,
        )
    savefig(fig, save)
    return ax


def niches(
    adata,
    *,
    niche_key: str = NICHE_KEY,
    library_id: str | None = None,
    image: bool = True,
    ax=None,
    title: str | None = None,
    save=None,
):
    """Niche labels (``obs[niche_key]``) over the H&E image. Returns the ``Axes``."""
    if niche_key not in adata.obs:
        raise InputError(
            f"pl.niches: obs[{niche_key!r}] not found: run tissuegraph.tl.niches first"
        )
    return spatial_scatter(
        adata, niche_key, library_id=library_id, image=image, ax=ax, title=title, save=save
    )


def niche_maps(
    adata,
    keys: Sequence[str] = (NICHE_KEY,),
    *,
    library_id: str | None = None,
    image: bool = True,
    titles: Sequence[str] | None = None,
    panel_size: float = 5.0,
    save=None,
):
    """Several label columns side by side over the image (e.g. niches next to the truth).
    Returns the ``Figure``."""
    plt = _plt()
    keys = list(keys)
    for k in keys:
        if k not in adata.obs:
            raise InputError(f"pl.niche_maps: obs[{k!r}] not found")
    fig, axes = plt.subplots(1, len(keys), figsize=(panel_size * 1.35 * len(keys), panel_size))
    axes = np.atleast_1d(axes)
    for i, (k, ax) in enumerate(zip(keys, axes)):
        spatial_scatter(
            adata,
            k,
            library_id=library_id,
            image=image,
            ax=ax,
            title=titles[i] if titles else k,
        )
    fig.tight_layout()
    savefig(fig, save)
    return fig


def composition(
    adata_or_frame,
    *,
    niche_key: str = NICHE_KEY,
    key: str | None = None,
    ax=None,
    title: str | None = None,
    save=None,
):
    """Stacked bars of the cell-type composition of each niche (from
    :func:`tissuegraph.tl.niche_composition`). Returns the ``Axes``."""
    plt = _plt()
    if isinstance(adata_or_frame, pd.DataFrame):
        comp = adata_or_frame
    else:
        k = key or f"{niche_key}_composition"
        if k not in adata_or_frame.uns:
            raise InputError(
                f"pl.composition: uns[{k!r}] not found: run tissuegraph.tl.niche_composition first"
            )
        comp = adata_or_frame.uns[k]["composition"]
        comp = comp if isinstance(comp, pd.DataFrame) else pd.DataFrame(comp)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.5 * len(comp), 4))
    fig = ax.figure
    cols = palette(comp.shape[1])
    bottom = np.zeros(len(comp))
    for j, c in enumerate(comp.columns):
        v = comp[c].fillna(0).to_numpy()
        ax.bar(np.arange(len(comp)), v, bottom=bottom, color=cols[j], label=str(c), width=0.8)
        bottom += v
    ax.set_xticks(np.arange(len(comp)))
    ax.set_xticklabels([str(i) for i in comp.index])
    ax.set_xlabel(comp.index.name or "niche")
    ax.set_ylabel("fraction")
    ax.set_title(title or "niche composition")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    savefig(fig, save)
    return ax


def nhood_enrichment(
    adata, *, cluster_key: str = NICHE_KEY, ax=None, vmax: float | None = None, save=None
):
    """Heatmap of neighbourhood-enrichment z-scores (from
    :func:`tissuegraph.tl.nhood_enrichment`). Returns the ``Axes``."""
    plt = _plt()
    k = f"{cluster_key}_nhood_enrichment"
    if k not in adata.uns:
        raise InputError(
            f"pl.nhood_enrichment: uns[{k!r}] not found: run tissuegraph.tl.nhood_enrichment first"
        )
    z = np.asarray(adata.uns[k]["zscore"], dtype=float)
    cats = [str(c) for c in adata.obs[cluster_key].astype("category").cat.categories]
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 + 0.45 * len(cats), 0.8 + 0.45 * len(cats)))
    fig = ax.figure
    finite = z[np.isfinite(z)]
    v = vmax or (float(np.percentile(np.abs(finite), 95)) if finite.size else 1.0)
    im = ax.imshow(np.nan_to_num(z), cmap="RdBu_r", vmin=-v, vmax=v)
    ax.set_xticks(range(len(cats)))
    ax.set_yticks(range(len(cats)))
    ax.set_xticklabels(cats)
    ax.set_yticklabels(cats)
    ax.set_xlabel(cluster_key)
    ax.set_ylabel(cluster_key)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="z-score")
    ax.set_title("neighbourhood enrichment")
    savefig(fig, save)
    return ax


def stability(adata, *, niche_key: str = NICHE_KEY, ax=None, save=None):
    """Cluster stability against K (from ``tl.niches(n_niches=None)``). Returns the ``Axes``."""
    plt = _plt()
    st = (adata.uns.get(niche_key) or {}).get("stability")
    if not st:
        raise InputError(
            f"pl.stability: uns[{niche_key!r}]['stability'] not found: run "
            "tissuegraph.tl.niches with n_niches=None first"
        )
    k = np.asarray(st["k"])
    s = np.asarray(st["stability"], dtype=float)
    sd = np.asarray(st.get("stability_std", np.zeros_like(s)), dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3.2))
    fig = ax.figure
    ax.errorbar(k, s, yerr=sd, marker="o", capsize=3, label="stability (ARI with K±1)")
    if "restart_ari" in st:
        ax.plot(k, st["restart_ari"], marker=".", ls="--", alpha=0.7, label="ARI between restarts")
    best = int(k[int(np.argmax(s))])
    ax.axvline(best, color="grey", ls=":", lw=1)
    ax.set_xlabel("number of niches K")
    ax.set_ylabel("ARI")
    ax.set_title(f"cluster stability (chosen K = {best})")
    ax.legend(fontsize=8, frameon=False)
    savefig(fig, save)
    return ax


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    """``run_dir/metrics.jsonl`` (or that file itself) as a DataFrame."""
    p = Path(run_dir)
    path = p if p.is_file() else p / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"pl.training_curves: {path} not found: run tissuegraph pretrain first")
    rows = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a partially written last line
    if not rows:
        raise InputError(f"pl.training_curves: {path} has no records")
    return pd.DataFrame(rows)


def training_curves(
    run_dir,
    *,
    terms: Sequence[str] | None = None,
    smooth: int = 1,
    save=None,
):
    """Total loss and each objective term against the step (from ``metrics.jsonl``; held-out
    ``val_<term>`` values on the same axes when logged). Returns the ``Figure``."""
    plt = _plt()
    df = read_metrics(run_dir)
    if "step" not in df:
        df["step"] = np.arange(len(df))
    if "split" in df:  # training records only when splits are logged
        df = df[df["split"].isin(["train", None]) | df["split"].isna()]
    skip = {"step", "epoch", "time", "lr", "split", "wall_s", "temperature", "spots_per_s"}
    num = [
        c
        for c in df.columns
        if c not in skip
        and not c.startswith("val_")
        and not c.startswith("temperature")
        and pd.api.types.is_numeric_dtype(df[c])
    ]
    cols = (
        list(terms)
        if terms
        else (["loss"] if "loss" in num else []) + [c for c in num if c != "loss"]
    )
    cols = [c for c in cols if c in df.columns and df[c].notna().any()]
    if not cols:
        raise InputError("pl.training_curves: no loss columns in metrics.jsonl")
    n = len(cols)
    ncol = min(n, 3)
    nrow = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.6 * nrow), squeeze=False)
    for ax, c in zip(axes.ravel(), cols):
        d = df[["step", c]].dropna()
        y = d[c].rolling(smooth, min_periods=1).mean() if smooth > 1 else d[c]
        ax.plot(d["step"], y, lw=1.2, label="train")
        if f"val_{c}" in df and df[f"val_{c}"].notna().any():
            v = df[["step", f"val_{c}"]].dropna()
            ax.plot(v["step"], v[f"val_{c}"], "o--", ms=3, lw=1, label="held-out")
            ax.legend(fontsize=7, frameon=False)
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    savefig(fig, save)
    return fig


def expression_maps(
    pred,
    genes: Sequence[str] | None = None,
    *,
    n_genes: int = 4,
    library_id: str | None = None,
    image: bool = False,
    save=None,
):
    """Measured (top row) vs predicted (bottom row) expression of a few genes, from
    :func:`tissuegraph.tl.predict_expression`. Default genes: the best predicted ones.
    Returns the ``Figure``."""
    plt = _plt()
    has_measured = "measured" in pred.layers
    if genes is None:
        if "pearson_r" in pred.var:
            genes = list(pred.var["pearson_r"].sort_values(ascending=False).index[:n_genes])
        else:
            genes = list(pred.var_names[:n_genes])
    genes = [g for g in genes]
    bad = [g for g in genes if g not in pred.var_names]
    if bad:
        raise InputError(f"pl.expression_maps: gene {bad[0]!r} not in the predicted panel")
    nrow = 2 if has_measured else 1
    fig, axes = plt.subplots(
        nrow, len(genes), figsize=(3.4 * len(genes), 3.2 * nrow), squeeze=False
    )
    for j, g in enumerate(genes):
        col = list(pred.var_names).index(g)
        p = np.asarray(pred.X[:, col]).ravel()
        r = pred.var["pearson_r"].iloc[col] if "pearson_r" in pred.var else None
        if has_measured:
            m = np.asarray(pred.layers["measured"][:, col]).ravel()
            spatial_scatter(
                pred,
                g,
                values=m,
                ax=axes[0, j],
                image=image,
                title=f"{g} measured",
                library_id=library_id,
            )
        spatial_scatter(
            pred,
            g,
            values=p,
            ax=axes[nrow - 1, j],
            image=image,
            library_id=library_id,
            title=f"{g} predicted" + (f" (r={r:.2f})" if r is not None and np.isfinite(r) else ""),
        )
    fig.tight_layout()
    savefig(fig, save)
    return fig


def save_niche_figures(
    adata, folder: str | os.PathLike, *, niche_key: str = NICHE_KEY, fmt: str = "png"
) -> list[Path]:
    """Write every niche figure that ``adata`` has the results for into ``folder``.

    ``niches.{fmt}`` always; ``stability``, ``composition`` and ``nhood_enrichment`` when
    ``uns`` holds them; ``support`` (the fraction of models agreeing with each spot's niche)
    after a consensus of several representations. Returns the written paths.
    """
    plt = _plt()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def emit(name, make):
        path = folder / f"{name}.{fmt}"
        obj = make()
        fig = obj if hasattr(obj, "savefig") else obj.figure
        savefig(fig, path)
        plt.close(fig)
        written.append(path)

    emit("niches", lambda: niches(adata, niche_key=niche_key))
    skey = f"{niche_key}_support"
    if skey in adata.obs and "consensus" in (adata.uns.get(niche_key) or {}):
        n = len((adata.uns[niche_key]["consensus"]).get("use_rep", []))
        emit(
            "support",
            lambda: spatial_scatter(
                adata, skey, cmap="magma", title=f"agreement of {n} clusterings with the niche"
            ),
        )
    if (adata.uns.get(niche_key) or {}).get("stability"):
        emit("stability", lambda: stability(adata, niche_key=niche_key))
    if f"{niche_key}_composition" in adata.uns:
        emit("composition", lambda: composition(adata, niche_key=niche_key))
    if f"{niche_key}_nhood_enrichment" in adata.uns:
        emit("nhood_enrichment", lambda: nhood_enrichment(adata, cluster_key=niche_key))
    return written
