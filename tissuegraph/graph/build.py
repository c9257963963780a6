"""Building one slide's graph: the build config, reading a slide and :func:`build_slide_graph`.

:mod:`tissuegraph.graph.pipeline` runs this over the slides of a build;
:mod:`tissuegraph.graph.panel` chooses the gene panel they share.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch_geometric.data import HeteroData

from tissuegraph import __version__
from tissuegraph import _layout as L
from tissuegraph._genes import match_ci
from tissuegraph._utils import stable_hash
from tissuegraph.config import with_defaults
from tissuegraph.errors import ConfigError, InputError
from tissuegraph.graph import schema as S
from tissuegraph.graph.config import BuildConfig
from tissuegraph.graph.coords import array_rc, grid_kind, microns_per_pixel, positions_um
from tissuegraph.graph.genes import as_csr, normalize_counts, panel_matrix, row_block, topk_per_row
from tissuegraph.graph.patches import (
    crop_patches,
    encode_patches,
    load_encoder,
    patch_hierarchy,
    standardize_per_slide,
    validate_sizes,
)
from tissuegraph.graph.priors import PriorEdges, PriorTables, prior_edges, read_prior_tables
from tissuegraph.graph.spatial import SPATIAL_METHODS, spot_graph

__all__ = [
    "PANEL_MODES",
    "as_build_config",
    "build_slide_graph",
    "graph_counts",
    "graph_options",
    "options_hash",
    "slide_config_hash",
    "validate_config",
]

PANEL_MODES = ("hvg", "list", "all")


# ----------------------------------------------------------------------------- config
def as_build_config(cfg) -> DictConfig:
    """A typed ``BuildConfig`` DictConfig from a DictConfig, a dataclass or a dict."""
    return with_defaults(BuildConfig, cfg)


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def validate_config(cfg: DictConfig) -> None:
    """Fail early, with one line naming the field, on an inconsistent build config."""
    if cfg.spatial.method not in SPATIAL_METHODS:
        raise ConfigError(
            f"spatial.method={cfg.spatial.method!r} is unknown: choose one of "
            f"{', '.join(SPATIAL_METHODS)}"
        )
    if cfg.panel.mode not in PANEL_MODES:
        raise ConfigError(
            f"panel.mode={cfg.panel.mode!r} is unknown: choose one of {', '.join(PANEL_MODES)}"
        )
    if cfg.patches.enabled:
        validate_sizes(cfg.patches.sizes_um)
        if cfg.patches.crop_px < 1:
            raise ConfigError(f"patches.crop_px must be >= 1, got {cfg.patches.crop_px}")
    if cfg.normalize.n_pcs < 0 or cfg.normalize.clip <= 0:
        raise ConfigError("normalize.n_pcs must be >= 0 and normalize.clip > 0")
    if cfg.priors.expresses_top_k < 0:
        raise ConfigError("priors.expresses_top_k must be >= 0 (0 = all nonzero genes)")
    names = [s.name for s in cfg.slides]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"slides: duplicate slide name {dup[0]!r}; names must be unique")
    for n in names:
        if n in ("???", "") or "/" in n or n.startswith("."):
            raise ConfigError(f"slides: invalid slide name {n!r} (used as the file name)")


def graph_options(cfg) -> dict:
    """The part of the config that changes a slide's graph (besides panel and slide).

    ``cfg``: anything :func:`as_build_config` accepts.
    """
    return _options(_plain(as_build_config(cfg)))


def _options(d: dict) -> dict:
    """:func:`graph_options` of an already resolved plain config (no second conversion)."""
    return {
        "schema_version": S.SCHEMA_VERSION,
        "normalize": d["normalize"],
        "spatial": d["spatial"],
        "patches": d["patches"],
        "priors": d["priors"],
        "keep_counts": d["keep_counts"],
    }


def options_hash(options: dict, **parts) -> str:
    """The one hash of a build configuration: its graph options plus ``parts``.

    Both the per-slide hash (:func:`slide_config_hash`) and a build's ``config_hash`` are
    this function of different parts; manifests store them, so their values never change.
    """
    return stable_hash({"options": options, **parts})


def slide_config_hash(
    cfg,
    spec: dict | None,
    genes: list[str],
    pathways: list[str],
    extra: dict | None = None,
    *,
    options: dict | None = None,
) -> str:
    """Hash of everything a slide's graph depends on (config, panel, slide spec, inputs).

    ``options``: :func:`graph_options` of ``cfg`` when already computed (else derived).
    """
    return options_hash(
        graph_options(cfg) if options is None else options,
        genes=stable_hash(list(genes)),
        pathways=stable_hash(list(pathways or [])),
        slide=spec,
        extra=extra or {},
    )


# ----------------------------------------------------------------------------- reading
def _read_spec(spec) -> object:
    from tissuegraph.datasets import read_slide

    return read_slide(spec)


def _in_tissue(adata):
    """Keep only spots under tissue when ``obs['in_tissue']`` says so."""
    if "in_tissue" in adata.obs:
        keep = np.asarray(adata.obs["in_tissue"]).astype(bool)
        if keep.any() and not keep.all():
            return adata[keep].copy()
    return adata


def _read_slide(spec) -> object:
    adata = _in_tissue(_read_spec(spec))
    if adata.n_obs == 0:
        raise InputError(f"slide {spec.name!r} has no spots")
    return adata


# ----------------------------------------------------------------------------- one slide
def _tg(adata) -> dict:
    return dict(adata.uns.get(L.TISSUEGRAPH, {}) or {})


def _microns_per_pixel(adata) -> float | None:
    """Ours (``uns["tissuegraph"]``), else from the standard layout (``graph.coords``)."""
    return microns_per_pixel(adata)


def _positions_um(adata) -> np.ndarray:
    return positions_um(adata)


def _array_rc(adata) -> np.ndarray | None:
    return array_rc(adata)


def _grid_kind(adata, rc: np.ndarray | None) -> str:
    return grid_kind(adata, rc)


def _has_image(adata) -> bool:
    tg = _tg(adata)
    if tg.get(L.IMAGE_PATH):
        return True
    for lib in (adata.uns.get(L.SPATIAL, {}) or {}).values():
        if isinstance(lib, dict) and lib.get("images"):
            return True
    return False


def _dense_f16(x, chunk_elems: int = 1 << 24) -> np.ndarray:
    n, g = x.shape
    out = np.zeros((n, g), dtype=np.float16)
    step = max(1, chunk_elems // max(g, 1))
    for a in range(0, n, step):
        out[a : a + step] = row_block(x, a, min(n, a + step))
    return out


def _as_prior_edges(priors, cfg: DictConfig, genes: list[str]) -> PriorEdges:
    if isinstance(priors, PriorEdges):
        return priors
    tables = priors if isinstance(priors, PriorTables) else read_prior_tables(cfg.priors)
    return prior_edges(genes, tables, min_pathway_genes=int(cfg.priors.min_pathway_genes))


def _restrict_pathways(pe: PriorEdges, pathways: list[str]) -> PriorEdges:
    """Re-index member_of edges onto a given pathway list (e.g. a checkpoint's)."""
    if pe.member_of is None:
        return pe
    pos = {p: i for i, p in enumerate(pathways)}
    new = np.asarray([pos.get(p, -1) for p in pe.pathways], dtype=np.int64)
    tgt = new[pe.member_of[1]] if pe.member_of.shape[1] else np.zeros(0, np.int64)
    keep = tgt >= 0
    return PriorEdges(
        regulates=pe.regulates,
        regulates_weight=pe.regulates_weight,
        binds=pe.binds,
        member_of=np.stack([pe.member_of[0][keep], tgt[keep]]),
        member_of_weight=pe.member_of_weight[keep],
        pathways=list(pathways),
        coverage=pe.coverage,
        has_tf=pe.has_tf,
    )


def _t(a, dtype=None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if dtype is None else t.to(dtype)


def build_slide_graph(
    adata,
    cfg,
    *,
    genes: list[str],
    pathways: list[str] | None = None,
    slide_name: str,
    slide_index: int = 0,
    priors=None,
    progress: bool = False,
    config_hash: str | None = None,
) -> HeteroData:
    """Build the heterogeneous graph of one slide with a given gene panel.

    Parameters
    ----------
    adata
        One slide in the tissuegraph/squidpy layout (raw counts in ``X``,
        ``obsm['spatial_um']``, ``obs['array_row'/'array_col']``, image in
        ``uns['spatial']`` or ``uns['tissuegraph']['image_path']``). Row ``i`` of every spot
        tensor is ``adata`` row ``i``; no spot is dropped.
    cfg
        A ``BuildConfig`` (normalize, spatial, patches, priors, keep_counts are used).
    genes
        The panel. Panel genes absent from ``adata`` become zero columns and are listed in
        ``data.meta['missing_genes']``.
    pathways
        Pathway node order to use (e.g. a checkpoint's); default: the pathways kept by the
        priors for this panel.
    priors
        ``PriorEdges`` computed for ``genes``, ``PriorTables``, or ``None`` to read
        ``cfg.priors``.

    Returns
    -------
    ``HeteroData`` following :mod:`tissuegraph.graph.schema`, with ``data.meta``.
    """
    cfg = as_build_config(cfg)
    validate_config(cfg)
    genes = [str(g) for g in genes]
    if not genes:
        raise ConfigError("the gene panel is empty")
    n = int(adata.n_obs)
    if n == 0:
        raise InputError(f"slide {slide_name!r} has no spots")
    tg = _tg(adata)

    # expression
    x_all = normalize_counts(adata.X, cfg.normalize.method, float(cfg.normalize.target_sum))
    xp, missing = panel_matrix(x_all, adata.var_names, genes)
    del x_all
    data = HeteroData()
    data[S.SPOT].x = _t(_dense_f16(xp))
    pos_um = _positions_um(adata)
    data[S.SPOT].pos = _t(pos_um.astype(np.float32))
    data[S.SPOT].slide = torch.full((n,), int(slide_index), dtype=torch.long)
    if cfg.keep_counts:
        raw, _ = panel_matrix(as_csr(adata.X), adata.var_names, genes)
        data[S.SPOT][S.COUNTS] = _t(raw.toarray().astype(np.float32))

    # spot graph
    sc = cfg.spatial
    rc = _array_rc(adata)
    grid = _grid_kind(adata, rc)
    ei, dist = spot_graph(
        pos_um,
        method=sc.method,
        array_rc=rc,
        grid=grid,
        rings=int(sc.rings),
        k=int(sc.k),
        radius_um=sc.radius_um,
        square_neighbors=int(sc.square_neighbors),
        max_length_um=sc.max_length_um,
    )
    data[S.SPOT_NEAR_SPOT].edge_index = _t(ei)
    data[S.SPOT_NEAR_SPOT].edge_attr = _t(dist.reshape(-1, 1))

    # genes and expression edges
    g = len(genes)
    data[S.GENE].index = torch.arange(g, dtype=torch.long)
    data[S.GENE].num_nodes = g
    r, c, v = topk_per_row(xp, int(cfg.priors.expresses_top_k))
    ex = np.stack([r, c])
    del r, c
    data[S.SPOT_EXPRESSES_GENE].edge_index = _t(ex)
    data[S.SPOT_EXPRESSES_GENE].edge_weight = _t(v)
    data[S.GENE_REV_EXPRESSES_SPOT].edge_index = _t(ex[::-1])
    data[S.GENE_REV_EXPRESSES_SPOT].edge_weight = _t(v)
    del xp

    # priors
    pe = _as_prior_edges(priors, cfg, genes)
    if pathways is not None:
        pe = _restrict_pathways(pe, [str(p) for p in pathways])
    if pe.has_tf:
        data[S.GENE_REGULATES_GENE].edge_index = _t(pe.regulates)
        data[S.GENE_REGULATES_GENE].edge_weight = _t(pe.regulates_weight)
    if pe.binds is not None:
        data[S.GENE_BINDS_GENE].edge_index = _t(pe.binds)
    if pe.member_of is not None and len(pe.pathways):
        data[S.PATHWAY].index = torch.arange(len(pe.pathways), dtype=torch.long)
        data[S.PATHWAY].num_nodes = len(pe.pathways)
        data[S.GENE_MEMBER_OF_PATHWAY].edge_index = _t(pe.member_of)
        data[S.GENE_MEMBER_OF_PATHWAY].edge_weight = _t(pe.member_of_weight)
        data[S.PATHWAY_REV_MEMBER_OF_GENE].edge_index = _t(pe.member_of[::-1])
        data[S.PATHWAY_REV_MEMBER_OF_GENE].edge_weight = _t(pe.member_of_weight)

    # image patches
    image_ref = None
    pc = cfg.patches
    sizes = [float(s) for s in pc.sizes_um]
    with_patches = bool(pc.enabled) and _has_image(adata)
    if with_patches:
        image_ref = _add_patches(data, adata, pos_um, cfg, progress=progress)

    gene_ids = list(genes)
    if "gene_ids" in adata.var:
        ids = [str(gid) for gid in adata.var["gene_ids"]]
        hit = match_ci(genes, adata.var_names)
        gene_ids = [ids[hit[gg]] if gg in hit else gg for gg in genes]
    data.meta = {
        "schema_version": S.SCHEMA_VERSION,
        "slide": str(slide_name),
        "slide_index": int(slide_index),
        "barcodes": [str(b) for b in adata.obs_names],
        "genes": genes,
        "gene_ids": gene_ids,
        "pathways": list(pe.pathways),
        "missing_genes": list(missing),
        "patch_sizes_um": sizes if with_patches else [],
        "crop_px": int(pc.crop_px) if with_patches else 0,
        "patch_feature": ("feat" if pc.encoder.name else "img") if with_patches else None,
        "config_hash": config_hash or slide_config_hash(cfg, None, genes, pe.pathways),
        "units": "um",
        "image": image_ref,
        "prior_coverage": pe.coverage,
        "platform": str(tg.get("platform", "unknown")),
        "library_id": str(tg.get("library_id", slide_name)),
        "microns_per_pixel": _microns_per_pixel(adata),
        "grid": grid if rc is not None else None,
        "spatial_method": str(sc.method),
        "normalize": str(cfg.normalize.method),
        "tissuegraph_version": __version__,
    }
    return data


def _add_patches(data: HeteroData, adata, pos_um: np.ndarray, cfg: DictConfig, progress: bool):
    """Add ``patch_k`` node types, their containment edges and crops/features."""
    from tissuegraph import io

    pc = cfg.patches
    sizes = validate_sizes(pc.sizes_um)
    h = patch_hierarchy(pos_um, sizes, origin_um=list(pc.origin_um))
    mpp = _microns_per_pixel(adata)
    if not mpp:
        raise InputError("uns['tissuegraph']['microns_per_pixel'] is missing: cannot crop patches")
    spatial_px = (
        np.asarray(adata.obsm[L.SPATIAL], dtype=np.float64) if L.SPATIAL in adata.obsm else None
    )
    enc = pc.encoder
    model = load_encoder(enc)[0] if enc.name else None
    with io.open_image(adata) as image:
        ref = str(_tg(adata).get("image_path") or getattr(image, "path", None) or "in-memory")
        for k in range(h.n_levels):
            nt = S.patch(k)
            centers_px = spatial_px if (k == 0 and spatial_px is not None) else h.pos[k] / mpp
            size_px = sizes[k] / mpp
            if enc.name:
                feat = encode_patches(
                    image,
                    centers_px,
                    size_px,
                    enc,
                    input_px=int(enc.input_px or pc.crop_px),
                    model=model,
                    progress=progress,
                    desc=f"{nt} features",
                )
                if enc.slide_standardize:
                    feat = standardize_per_slide(feat).astype(np.float16)
                data[nt].feat = _t(feat)
            else:
                crops = crop_patches(
                    image,
                    centers_px,
                    size_px,
                    int(pc.crop_px),
                    progress=progress,
                    desc=f"{nt} crops",
                )
                data[nt].img = _t(crops)
            data[nt].pos = _t(h.pos[k].astype(np.float32))
            data[nt].size_um = torch.tensor([sizes[k]], dtype=torch.float32)
            data[nt].num_nodes = len(h.pos[k])
    n = len(pos_um)
    of = np.stack([np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64)])
    data[S.PATCH0_OF_SPOT].edge_index = _t(of)
    data[S.SPOT_REV_OF_PATCH0].edge_index = _t(of.copy())
    for k in range(h.n_levels - 1):
        child = np.arange(len(h.pos[k]), dtype=np.int64)
        e = np.stack([child, h.parent[k]])
        data[S.patch_in_parent(k)].edge_index = _t(e)
        data[S.patch_in_parent(k)].loc = _t(h.loc[k])
        data[S.parent_rev_in_patch(k)].edge_index = _t(e[::-1])
        data[S.parent_rev_in_patch(k)].loc = _t(h.loc[k].copy())
    return ref


# ----------------------------------------------------------------------------- summaries
def graph_counts(data: HeteroData) -> tuple[dict, dict]:
    nodes = {nt: int(data[nt].num_nodes or 0) for nt in data.node_types}
    edges = {"__".join(et): int(data[et].edge_index.shape[1]) for et in data.edge_types}
    return nodes, edges
