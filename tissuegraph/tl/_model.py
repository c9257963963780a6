"""AnnData-facing use of a pretrained checkpoint: embed, predict expression from H&E."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tissuegraph import _layout as L
from tissuegraph._genes import count_ci
from tissuegraph.errors import InputError
from tissuegraph.tl._core import EMBED_KEY, check_adata, check_choice, store_params

KINDS = ("fused", "expression", "image")
PREDICT_METHODS = ("auto", "decoder", "probe")
#: the default of ``predict_expression(method=...)``: the probe (the better one in
#: benchmarks/image_to_expression_her2st.py, see its docstring) when the checkpoint holds one
DEFAULT_PREDICT_METHOD = "auto"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".svs", ".bmp")


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"`` (as a string, for ``uns``)."""
    from tissuegraph._utils import resolve_device as _resolve

    return str(_resolve(device))


def load_checkpoint(checkpoint, device: str, func: str):
    """``(model, info)`` of a checkpoint path, or ``checkpoint`` itself when already loaded."""
    if isinstance(checkpoint, tuple) and len(checkpoint) == 2:
        return checkpoint
    path = Path(checkpoint)
    if not path.is_file():
        raise InputError(
            f"{func}: checkpoint {path} not found: run tissuegraph.train.loop.pretrain "
            "(tissuegraph pretrain) first"
        )
    from tissuegraph.nn.checkpoint import load

    ck = load(path, device)
    return ck.model, ck.info()


# ------------------------------------------------------------------ does the slide fit?
#: Integer values above this are counts: no log-normalised value comes near it
#: (``log1p`` of a million is 13.8).
_COUNT_MAX = 30.0


def _gene_overlap(adata, genes: list[str]) -> int:
    """Panel genes found in ``adata.var_names`` (case-insensitive, as the graph builder)."""
    return count_ci(genes, adata.var_names)


def check_gene_overlap(adata, info: dict, func: str, min_gene_overlap: float) -> None:
    """Refuse a slide that shares less than ``min_gene_overlap`` of the checkpoint's panel."""
    if not 0.0 <= float(min_gene_overlap) <= 1.0:
        raise InputError(f"{func}: min_gene_overlap must lie in [0, 1], got {min_gene_overlap}")
    genes = [str(g) for g in info.get("genes") or []]
    if not genes:
        return
    n = _gene_overlap(adata, genes)
    if n >= float(min_gene_overlap) * len(genes):
        return
    hint = "use a checkpoint trained on this slide's genes, or lower min_gene_overlap"
    if "gene_ids" in adata.var:
        k = count_ci(genes, adata.var["gene_ids"])
        if k > n:
            hint = f"var['gene_ids'] match {k}: use them as var_names"
    raise InputError(
        f"{func}: the slide shares {n} of the checkpoint's {len(genes)} panel genes "
        f"({n / len(genes):.0%}, min_gene_overlap={float(min_gene_overlap):.0%}); {hint}"
    )


def _expected_expression(info: dict) -> tuple[str | None, str]:
    """What the model was fed: ``("raw", why)``, ``("normalized", why)`` or ``(None, "")``.

    ``log1p_cp10k`` / ``log1p`` graphs are built from raw counts; with ``none`` the slides'
    values went in as stored, so the training slides' ``expression`` decides.
    """
    bc = info.get("build_config") or {}
    method = str((bc.get("normalize") or {}).get("method", "log1p_cp10k"))
    if method != "none":
        return "raw", f"its graphs were built from raw counts (normalize.method={method})"
    slides = [s for s in bc.get("slides") or [] if isinstance(s, dict)]
    kinds = {str(s.get("expression") or "raw") for s in slides}
    if len(kinds) == 1:
        kind = kinds.pop()
        return kind, f"it was trained on {kind} values as stored (normalize.method=none)"
    return None, ""


def check_input_values(adata, info: dict, func: str) -> None:
    """Refuse expression that the checkpoint's model was not trained on: NaN, infinite or
    negative values; normalised values where raw counts went in; raw counts where
    normalised values went in (integers above 30, which no log-normalised value reaches)."""
    from tissuegraph.io._common import check_values

    x = adata.X
    if x is None:
        raise InputError(f"{func}: adata.X is empty; store the slide's expression in X")
    expected, why = _expected_expression(info)
    check_values(
        x,
        source=f"{func}: adata.X",
        obs_names=adata.obs_names,
        var_names=adata.var_names,
        expression="normalized",
        allow_negative=expected != "raw",
        what="expression",
    )
    data = np.asarray(x.data if sp.issparse(x) else x).ravel()
    data = data[data != 0]
    if expected is None or data.size == 0:
        return
    integer = bool(np.all(data == np.round(data)))
    vmax, vmean = float(data.max()), float(data.mean())
    stats = f"non-zero values: max {vmax:.3g}, mean {vmean:.3g}"
    if expected == "raw" and not integer:
        raise InputError(
            f"{func}: adata.X holds non-integer values ({stats}), i.e. normalised expression, "
            f"but the checkpoint expects raw counts: {why}; put raw counts in X "
            "(e.g. adata.layers['counts'] or adata.raw)"
        )
    if expected == "normalized" and integer and vmax > _COUNT_MAX:
        raise InputError(
            f"{func}: adata.X holds raw counts ({stats}) but {why}; normalise the slide "
            "as the training slides were"
        )


def _existing_priors(build_config: dict) -> dict:
    """Drop prior-table paths of a stored build config that do not exist here."""
    cfg = dict(build_config)
    pri = dict(cfg.get("priors") or {})
    gone = [
        k
        for k in ("tf_targets", "pathways", "gmt", "ligand_receptor")
        if pri.get(k) and not Path(str(pri[k])).is_file()
    ]
    if gone:
        warnings.warn(
            "prior tables of the checkpoint's build config not found here and left out: "
            + ", ".join(f"{k}={pri[k]}" for k in gone),
            stacklevel=3,
        )
        for k in gone:
            pri[k] = None
        cfg["priors"] = pri
    return cfg


def graph_for_adata(adata, info: dict, *, slide_name: str | None = None, progress: bool = False):
    """Build the graph of ``adata`` with the checkpoint's build config, panel and pathways."""
    from tissuegraph.graph.pipeline import build_slide_graph

    cfg = _existing_priors(info.get("build_config") or {})
    spatial = adata.uns.get(L.SPATIAL) or {}
    lib = (adata.uns.get(L.TISSUEGRAPH) or {}).get(L.LIBRARY_ID) or (
        next(iter(spatial)) if len(spatial) == 1 else "slide"
    )
    return build_slide_graph(
        adata,
        cfg,
        genes=list(info["genes"]),
        pathways=list(info.get("pathways") or []) or None,
        slide_name=str(slide_name or lib),
        progress=progress,
    )


def _graph_spots(graph) -> int:
    from tissuegraph.graph import schema as S

    return int(graph[S.SPOT].num_nodes)


def embed(
    adata,
    checkpoint,
    *,
    graph=None,
    kind: str = "fused",
    device: str = "auto",
    batch_spots: int | None = None,
    min_gene_overlap: float = 0.5,
    key_added: str = EMBED_KEY,
    copy: bool = False,
):
    """Spot embeddings of a pretrained tissuegraph model.

    The slide's graph is built with the checkpoint's stored build config and gene panel
    (``tissuegraph.graph.pipeline.build_slide_graph``; panel genes missing from the slide
    become zero columns and are reported) unless ``graph`` is given, then encoded in
    spatial tiles by ``tissuegraph.train.infer.embed_graph``.

    Parameters
    ----------
    adata
        One slide with raw counts: tissuegraph's layout (``obsm['spatial_um']``) or the
        standard one of scanpy / squidpy readers (``obsm['spatial']`` in full-resolution
        pixels, ``uns['spatial'][library_id]['scalefactors']``; µm per pixel from the spot
        lattice or the scale factors, see ``tissuegraph.graph.coords``).
    checkpoint
        Path of a checkpoint written by ``pretrain`` (or a ``(model, info)`` pair from
        ``tissuegraph.train.checkpoint.load_model``).
    graph
        A prebuilt ``HeteroData`` of this slide (rows in ``adata`` order).
    kind
        ``"fused"`` (expression + image + context), ``"expression"`` or ``"image"``.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    batch_spots
        Spots per tile (default: the inference default).
    min_gene_overlap
        Least fraction of the checkpoint's panel genes the slide must have; below it the
        slide is refused (:class:`~tissuegraph.errors.InputError` naming both numbers). The
        slide's values are also checked against what the model was trained on (raw counts
        or normalised values, see the checkpoint's ``normalize.method``).
    key_added
        obsm / uns key.

    Returns
    -------
    Writes ``obsm[key_added]`` (float32 ``[N, D]``) and ``uns[key_added]`` (``params``,
    ``checkpoint_hash``, ``step``, ``build_config`` (JSON text), ``missing_genes``,
    ``n_missing_genes``, ``scale_for_clustering`` (:func:`scale_for_clustering`)). ``None``,
    or the copy.
    """
    func = "embed"
    check_adata(adata, func)
    check_choice(kind, "kind", KINDS, func)
    dev = resolve_device(device)
    model, info = load_checkpoint(checkpoint, dev, func)
    check_gene_overlap(adata, info, func, min_gene_overlap)
    check_input_values(adata, info, func)
    adata = adata.copy() if copy else adata
    if graph is None:
        graph = graph_for_adata(adata, info)
    elif _graph_spots(graph) != adata.n_obs:
        raise InputError(
            f"{func}: graph has {_graph_spots(graph)} spots but adata has {adata.n_obs}; "
            "pass the graph built from this AnnData"
        )
    meta = getattr(graph, "meta", None) or {}
    missing = [str(g) for g in meta.get("missing_genes", [])]
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(info['genes'])} panel genes are missing from the slide "
            f"(zero columns), e.g. {', '.join(missing[:5])}",
            stacklevel=2,
        )
    from tissuegraph.train.infer import embed_graph

    kw = {"kind": kind, "device": dev}
    if batch_spots is not None:
        kw["batch_spots"] = int(batch_spots)
    z = np.asarray(embed_graph(model, graph, **kw), dtype=np.float32)
    if z.shape[0] != adata.n_obs:
        raise InputError(f"{func}: the model returned {z.shape[0]} rows for {adata.n_obs} spots")
    adata.obsm[key_added] = z
    store_params(
        adata,
        key_added,
        {
            "checkpoint": str(checkpoint) if not isinstance(checkpoint, tuple) else "in-memory",
            "kind": kind,
            "device": dev,
            "min_gene_overlap": float(min_gene_overlap),
        },
        checkpoint_hash=str(info.get("checkpoint_hash", "")),
        step=int(info.get("step", -1) or -1),
        build_config=json.dumps(info.get("build_config") or {}, default=str, sort_keys=True),
        missing_genes=missing,
        n_missing_genes=len(missing),
        scale_for_clustering=scale_for_clustering(model, graph, kind),
    )
    return adata if copy else None


def scale_for_clustering(model, graph, kind: str) -> bool:
    """Whether :func:`~tissuegraph.tl.niches` should standardise this embedding's features
    by default (``uns[key]['scale_for_clustering']``, read when ``scale=None``).

    Yes when a LayerNorm shapes the embedding (between GNN layers, in the MLP expression
    encoder, in the image fusion): its per-feature scales carry no meaning. No for the
    linear-input, norm-free GCN of the DLPFC recipe, whose feature variances are signal, as
    in PCA. Measured: the DLPFC recipe clusters 151674 to 0.592 unscaled vs 0.581 scaled
    (5 seeds; 0.581 vs 0.551 with the earlier 1-hop local-global summary); the demo's model (MLP encoder, LayerNorm, image fusion) 0.73 scaled vs 0.65
    unscaled.
    """
    c = dict(getattr(model, "cfg", None) or {})
    if kind == "image" or bool(c.get("norm", True)) or int(c.get("expr_hidden_dim") or 0) > 0:
        return True
    node_types = getattr(graph, "node_types", None) or []
    fused = kind != "expression" and getattr(model, "fuse", None) is not None
    return bool(fused and "patch_0" in node_types)


# ------------------------------------------------------------------ image -> expression
def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256)
    centers = (edges[:-1] + edges[1:]) / 2
    w1 = np.cumsum(hist)
    w2 = np.cumsum(hist[::-1])[::-1]
    m1 = np.cumsum(hist * centers) / np.maximum(w1, 1)
    m2 = (np.cumsum((hist * centers)[::-1]) / np.maximum(w2[::-1], 1))[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centers[:-1][np.argmax(between)])


def tissue_mask(thumb: np.ndarray) -> np.ndarray:
    """Tissue pixels of an RGB thumbnail: colour saturation above Otsu's threshold (and
    not near-black padding)."""
    rgb = thumb.astype(np.float32) / 255.0
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    thr = max(_otsu(sat.ravel()), 0.05)
    mask = (sat > thr) & (mx > 0.15)
    try:  # close small holes/specks when scipy.ndimage is there (it is with scipy)
        from scipy import ndimage

        mask = ndimage.binary_closing(mask, iterations=2)
        mask = ndimage.binary_opening(mask, iterations=1)
    except ImportError:  # pragma: no cover
        pass
    return mask


def pseudo_spots(
    image_path,
    *,
    spacing_um: float = 100.0,
    microns_per_pixel: float | None = None,
    genes: list[str] | None = None,
    max_side: int = 1024,
):
    """AnnData of a hexagonal lattice of pseudo-spots laid over the tissue of an image.

    Tissue is detected on a thumbnail by colour saturation (Otsu threshold). The lattice
    follows Visium's convention (``array_col`` and ``array_row`` of equal parity;
    neighbours at ``(0, +-2)`` and ``(+-1, +-1)``) with ``spacing_um`` between neighbours.

    Returns
    -------
    AnnData (``X`` all-zero counts over ``genes``) in the tissuegraph layout, with
    ``obsm['spatial']`` (full-res px), ``obsm['spatial_um']``, ``uns['spatial']`` (the
    thumbnail as ``lowres``) and ``uns['tissuegraph']['image_path']``.
    """
    from tissuegraph._layout import slide_anndata
    from tissuegraph.io.image import SlideImage

    path = Path(image_path)
    img = SlideImage.from_file(path, microns_per_pixel=microns_per_pixel)
    try:
        mpp = microns_per_pixel or img.microns_per_pixel
        if not mpp:
            mpp = 0.5
            warnings.warn(
                f"{path.name}: pixel size unknown; assuming 0.5 µm/px (20x). Pass "
                "microns_per_pixel for correct patch sizes",
                stacklevel=3,
            )
        thumb, scale = img.thumbnail(max_side)
        h_full, w_full = img.shape
    finally:
        img.close()
    mask = tissue_mask(thumb)
    step_px = spacing_um / mpp
    dy = step_px * np.sqrt(3) / 2
    rows = np.arange(int(h_full / dy) + 1)
    cols = np.arange(int(w_full / (step_px / 2)) + 1)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    keep = (rr % 2) == (cc % 2)
    rr, cc = rr[keep], cc[keep]
    x = cc * step_px / 2 + step_px / 4
    y = rr * dy + dy / 2
    tx = np.clip((x * scale).astype(int), 0, mask.shape[1] - 1)
    ty = np.clip((y * scale).astype(int), 0, mask.shape[0] - 1)
    inside = mask[ty, tx]
    if not inside.any():
        raise InputError(f"predict_expression: no tissue detected in {path}")
    rr, cc, x, y = rr[inside], cc[inside], x[inside], y[inside]
    genes = list(genes or [])
    n = int(rr.size)
    lib = path.stem
    return slide_anndata(
        sp.csr_matrix((n, len(genes)), dtype=np.float32),
        obs_names=[f"{r}x{c}" for r, c in zip(rr, cc)],
        var_names=genes,
        gene_ids=genes,
        in_tissue=1,
        array_row=rr,
        array_col=cc,
        spatial_px=np.column_stack([x, y]),
        microns_per_pixel=mpp,
        library_id=lib,
        platform="visium",
        spot_diameter_um=0.55 * spacing_um,
        spot_spacing_um=spacing_um,
        grid="hex",
        image_path=str(path),
        source=str(path),
        images={"lowres": thumb},
        scalefactors={
            "tissue_lowres_scalef": scale,
            "spot_diameter_fullres": 0.55 * spacing_um / mpp,
        },
        metadata={"source": str(path)},
        allow_no_genes=True,
    )


def _panel_lognorm(adata, genes: list[str]) -> np.ndarray:
    from tissuegraph.tl._core import log_normalized, match_genes_ci

    x = log_normalized(adata)
    hits = match_genes_ci(genes, list(adata.var_names))
    out = np.zeros((adata.n_obs, len(genes)), dtype=np.float32)
    idx = [(i, hits[g]) for i, g in enumerate(genes) if g in hits]
    if idx:
        a, b = zip(*idx)
        out[:, list(a)] = x[:, list(b)].toarray()
    return out


def pearson_per_gene(pred: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column (NaN where either is constant)."""
    p = pred - pred.mean(axis=0)
    m = measured - measured.mean(axis=0)
    den = np.sqrt((p * p).sum(axis=0) * (m * m).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (p * m).sum(axis=0) / den
    return np.where(den > 0, r, np.nan)


def predict_expression(
    adata_or_image,
    checkpoint,
    *,
    pseudo_spacing_um: float | None = None,
    microns_per_pixel: float | None = None,
    use_expression: bool = False,
    device: str = "auto",
    batch_spots: int | None = None,
    min_gene_overlap: float = 0.5,
    method: str = DEFAULT_PREDICT_METHOD,
):
    """Predict the checkpoint's gene panel from the H&E image.

    Input is either an AnnData with spot coordinates and an image (its expression is
    ignored unless ``use_expression``; when present it is kept as ``layers['measured']``
    and scored), a path to a slide that :func:`tissuegraph.io.read_any` opens, or a bare
    image file: pseudo-spots are then laid on a hexagonal lattice over the detected
    tissue (colour saturation), ``pseudo_spacing_um`` apart.

    Parameters
    ----------
    adata_or_image
        AnnData, slide folder / .h5ad, or image file (.jpg/.png/.tif...).
    checkpoint
        Checkpoint path (or ``(model, info)``).
    pseudo_spacing_um
        Lattice spacing for a bare image (default 100 µm).
    microns_per_pixel
        Pixel size of a bare image (read from TIFF metadata when possible; else 0.5 is
        assumed with a warning).
    use_expression
        Give the model the measured expression of the neighbouring spots as context
        (each spot's own expression is always hidden). Default: image only.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    batch_spots
        Spots per tile (default: the inference default).
    min_gene_overlap
        A slide with measured expression must share at least this fraction of the
        checkpoint's panel genes (else :class:`~tissuegraph.errors.InputError`); with
        ``use_expression`` its values must also be of the kind the model was trained on.
    method
        ``"auto"`` (default): ``"probe"`` when the checkpoint holds one (pretrained with
        patches), else ``"decoder"``. ``"probe"``: the ridge probe stored in the checkpoint at the end of
        pretraining (standardise -> PCA -> ridge on image-side features: the stored
        features of the spot's ``patch_0`` and of the ``patch_1`` / ``patch_2`` regions
        containing it, their mean over the spot's neighbours, and the model's image-only
        embedding; penalty chosen by cross-validation over the training slides).
        ``"decoder"``: the model's expression decoder with the expression of every spot
        hidden (trained by the ``image_expression`` objective); with ``use_expression``
        the decoder always runs, with each spot's own expression hidden and its
        neighbours' visible. On HER2ST (``benchmarks/image_to_expression_her2st.py``,
        leave-one-section-out over patient C, 50 genes chosen on the training sections,
        frozen random-init resnet10t + colour features) the probe reached a mean Pearson
        r of 0.387 and the decoder 0.296 (B4, another patient: 0.129 and 0.102), so the
        probe is the default; see the README for the full table.

    Returns
    -------
    AnnData spots x panel genes: ``X`` float32 predicted log-normalised expression,
    ``obs`` / ``obsm['spatial']`` / ``obsm['spatial_um']`` / ``uns['spatial']`` /
    ``uns['tissuegraph']`` of the input (with ``expression="normalized"``: what ``X`` holds), ``layers['measured']`` and
    ``var['pearson_r']`` when measured expression exists, ``uns['tg_predict']``
    (``params``, ``checkpoint_hash``, ``missing_genes``, ``mean_pearson_r``).
    """
    from anndata import AnnData

    func = "predict_expression"
    check_choice(method, "method", PREDICT_METHODS, func)
    if use_expression:
        method = "decoder"
    dev = resolve_device(device)
    if isinstance(adata_or_image, (str, os.PathLike)):
        p = Path(adata_or_image)
        if not p.exists():
            raise InputError(f"{func}: {p} not found")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            model, info = load_checkpoint(checkpoint, dev, func)
            src = pseudo_spots(
                p,
                spacing_um=float(pseudo_spacing_um or 100.0),
                microns_per_pixel=microns_per_pixel,
                genes=list(info["genes"]),
            )
            has_measured = False
        else:
            from tissuegraph.io import read_any

            src = read_any(p)
            model, info = load_checkpoint(checkpoint, dev, func)
            has_measured = src.n_vars > 0 and src.X is not None and src.X.sum() > 0
    else:
        check_adata(adata_or_image, func)
        if L.SPATIAL not in adata_or_image.obsm:
            raise InputError(
                f"{func}: obsm['spatial'] not found: read the slide with tissuegraph.io"
            )
        src = adata_or_image
        model, info = load_checkpoint(checkpoint, dev, func)
        has_measured = src.n_vars > 0 and float(abs(src.X).sum()) > 0
    genes = [str(g) for g in info["genes"]]
    if has_measured or use_expression:
        check_gene_overlap(src, info, func, min_gene_overlap)
    if use_expression:
        check_input_values(src, info, func)
    # the graph input: the slide without expression unless asked for
    if use_expression:
        graph_src = src
    else:
        graph_src = AnnData(
            sp.csr_matrix((src.n_obs, len(genes)), dtype=np.float32),
            obs=src.obs.copy(),
            obsm={k: np.asarray(src.obsm[k]) for k in (L.SPATIAL, L.SPATIAL_UM) if k in src.obsm},
            uns={k: src.uns[k] for k in (L.SPATIAL, L.TISSUEGRAPH) if k in src.uns},
        )
        graph_src.var_names = genes
    graph = graph_for_adata(graph_src, info)
    from tissuegraph.train.infer import predict_graph

    kw = {"device": dev}
    if batch_spots is not None:
        kw["batch_spots"] = int(batch_spots)
    if method == "auto":
        method = "probe" if info.get("probe") else "decoder"
    if method == "probe":
        probe = info.get("probe")
        if not probe:
            raise InputError(
                f"{func}: checkpoint {checkpoint} holds no image -> expression probe (trained "
                "without patches or with train.probe=false): use method='decoder'"
            )
        from tissuegraph.train.probe import apply_probe, probe_features

        pred = apply_probe(probe, probe_features(model, graph, **kw))
    else:
        pred = predict_graph(model, graph, image_only=not use_expression, **kw)
    pred = np.asarray(pred, dtype=np.float32)
    out = AnnData(pred, obs=src.obs.copy())
    out.var_names = genes
    for k in (L.SPATIAL, L.SPATIAL_UM):
        if k in src.obsm:
            out.obsm[k] = np.asarray(src.obsm[k])
    for k in (L.SPATIAL, L.TISSUEGRAPH):
        if k in src.uns:
            out.uns[k] = src.uns[k]
    # X holds predictions: written out, the file says so (read back as expression="normalized")
    out.uns[L.TISSUEGRAPH] = {**dict(out.uns.get(L.TISSUEGRAPH) or {}), L.EXPRESSION: "normalized"}
    extra = {}
    if has_measured:
        measured = _panel_lognorm(src, genes)
        out.layers["measured"] = measured
        r = pearson_per_gene(pred, measured)
        out.var["pearson_r"] = r
        extra["mean_pearson_r"] = float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
    missing = [str(g) for g in (getattr(graph, "meta", None) or {}).get("missing_genes", [])]
    store_params(
        out,
        "tg_predict",
        {
            "checkpoint": str(checkpoint) if not isinstance(checkpoint, tuple) else "in-memory",
            "pseudo_spacing_um": pseudo_spacing_um,
            "use_expression": use_expression,
            "device": dev,
            "min_gene_overlap": float(min_gene_overlap),
            "method": method,
        },
        checkpoint_hash=str(info.get("checkpoint_hash", "")),
        missing_genes=missing if has_measured else [],
        **extra,
    )
    return out


def measured_vs_predicted(pred) -> pd.DataFrame:
    """Per-gene Pearson r of a :func:`predict_expression` result (sorted, best first)."""
    if "pearson_r" not in pred.var:
        raise InputError(
            "measured_vs_predicted: var['pearson_r'] not found: run "
            "tissuegraph.tl.predict_expression on a slide with measured expression"
        )
    return (
        pred.var[["pearson_r"]]
        .rename_axis("gene")
        .reset_index()
        .sort_values("pearson_r", ascending=False)
        .reset_index(drop=True)
    )
