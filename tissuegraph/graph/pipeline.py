"""``build-graphs``: slides -> one ``HeteroData`` per slide + ``manifest.json``.

:func:`build_graphs` reads every slide of a :class:`~tissuegraph.graph.config.BuildConfig`,
chooses the shared gene panel (:func:`select_panel`), builds each slide's graph
(:func:`build_slide_graph`, in parallel over slides) and writes ``<out_dir>/<slide>.pt``,
``manifest.json`` and the resolved ``config.yaml``, all atomically. Slides whose file is up
to date (same configuration hash) are skipped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch_geometric.data import HeteroData

from tissuegraph import __version__
from tissuegraph._logging import logger
from tissuegraph._utils import file_hash, stable_hash, write_json_atomic
from tissuegraph.errors import ConfigError, InputError, TissueGraphError
from tissuegraph.graph import schema as S
from tissuegraph.graph.config import BuildConfig, SlideSpec
from tissuegraph.graph.coords import array_rc, grid_kind, microns_per_pixel, positions_um
from tissuegraph.graph.genes import (
    as_csr,
    normalize_counts,
    panel_matrix,
    row_block,
    select_hvg,
    topk_per_row,
)
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
from tissuegraph.graph.storage import (
    read_manifest,
    save_graph,
    write_manifest,
    write_resolved_config,
)

__all__ = [
    "build_graphs",
    "build_slide_graph",
    "select_panel",
    "as_build_config",
    "slide_config_hash",
    "merge_shards",
    "parse_shard",
    "panel_hash",
    "shard_slides",
]

PANEL_MODES = ("hvg", "list", "all")


# ----------------------------------------------------------------------------- config
def as_build_config(cfg) -> DictConfig:
    """A typed ``BuildConfig`` DictConfig from a DictConfig, a dataclass or a dict."""
    base = OmegaConf.structured(BuildConfig)
    if isinstance(cfg, DictConfig):
        return OmegaConf.merge(base, cfg)
    if isinstance(cfg, dict):
        return OmegaConf.merge(base, OmegaConf.create(cfg))
    return OmegaConf.merge(base, OmegaConf.structured(cfg))


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


def _graph_options(cfg: DictConfig) -> dict:
    """The part of the config that changes a slide's graph (besides panel and slide)."""
    d = _plain(cfg)
    return {
        "schema_version": S.SCHEMA_VERSION,
        "normalize": d["normalize"],
        "spatial": d["spatial"],
        "patches": d["patches"],
        "priors": d["priors"],
        "keep_counts": d["keep_counts"],
    }


def slide_config_hash(
    cfg, spec: dict | None, genes: list[str], pathways: list[str], extra: dict | None = None
) -> str:
    """Hash of everything a slide's graph depends on (config, panel, slide spec, inputs)."""
    return stable_hash(
        {
            "options": _graph_options(as_build_config(cfg)),
            "genes": stable_hash(list(genes)),
            "pathways": stable_hash(list(pathways or [])),
            "slide": spec,
            "extra": extra or {},
        }
    )


def _fingerprint(spec: dict) -> dict:
    """Size and mtime of the slide's input files (a changed input triggers a rebuild)."""
    out = {}
    for key in ("path", "counts", "spots", "image", "image_path"):
        p = spec.get(key)
        if not p:
            continue
        p = Path(p)
        if p.is_file():
            st = p.stat()
            out[key] = [st.st_size, st.st_mtime_ns]
        elif p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.is_file())[:200]
            out[key] = [
                [str(q.relative_to(p)), q.stat().st_size, q.stat().st_mtime_ns] for q in files
            ]
        else:
            out[key] = None
    return out


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


# ----------------------------------------------------------------------------- panel
def _read_genes_file(path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"panel.genes_file: file not found: {p}")
    out = []
    for line in p.read_text().splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            out.append(s.split()[0])
    return out


def _dedup(genes) -> list[str]:
    seen, out = set(), []
    for g in genes:
        g = str(g)
        if g.upper() not in seen:
            seen.add(g.upper())
            out.append(g)
    return out


def select_panel(adatas: dict, cfg) -> list[str]:
    """Choose the gene panel shared by all slides.

    Parameters
    ----------
    adatas
        ``slide name -> AnnData`` (raw counts in ``X``). ``mode=list`` needs none.
    cfg
        A ``BuildConfig``; ``cfg.panel`` is used.

    Returns
    -------
    Gene symbols. ``hvg``: the ``n_top`` most variable genes computed **only** on
    ``panel.fit_slides`` when given (so that held-out sections do not influence the panel),
    else on all slides; ``list``: ``panel.genes`` or ``panel.genes_file``; ``all``: genes
    present in every slide (case-insensitive, in the first slide's order).
    """
    cfg = as_build_config(cfg)
    pc = cfg.panel
    if pc.mode == "list":
        genes = list(pc.genes or [])
        if pc.genes_file:
            genes += _read_genes_file(pc.genes_file)
        genes = _dedup(genes)
        if not genes:
            raise ConfigError("panel.mode=list needs panel.genes or panel.genes_file")
        return genes
    if not adatas:
        raise InputError("no slides could be read to choose the gene panel")
    if pc.mode == "all":
        names = list(adatas)
        first = [str(g) for g in adatas[names[0]].var_names]
        common = {g.upper() for g in first}
        for n in names[1:]:
            common &= {str(g).upper() for g in adatas[n].var_names}
        genes = _dedup(g for g in first if g.upper() in common)
        if not genes:
            raise InputError(f"panel.mode=all: no gene is shared by all slides {names}")
        return genes
    if pc.mode == "hvg":
        fit = list(pc.fit_slides) if pc.fit_slides else list(adatas)
        unknown = [f for f in fit if f not in adatas]
        if unknown:
            raise ConfigError(
                f"panel.fit_slides: {unknown[0]!r} is not a readable slide of this build "
                f"(slides: {', '.join(adatas)})"
            )
        if pc.n_top < 1:
            raise ConfigError(f"panel.n_top must be >= 1, got {pc.n_top}")
        data = {f: (as_csr(adatas[f].X), [str(g) for g in adatas[f].var_names]) for f in fit}
        return select_hvg(data, int(pc.n_top), flavor=pc.flavor, min_spots=int(pc.min_spots))
    raise ConfigError(f"panel.mode={pc.mode!r} is unknown")


# ----------------------------------------------------------------------------- one slide
def _tg(adata) -> dict:
    return dict(adata.uns.get("tissuegraph", {}) or {})


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
    if tg.get("image_path"):
        return True
    for lib in (adata.uns.get("spatial", {}) or {}).values():
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
        up = {}
        for name, gid in zip(adata.var_names, adata.var["gene_ids"]):
            up.setdefault(str(name).upper(), str(gid))
        gene_ids = [up.get(gg.upper(), gg) for gg in genes]
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
        np.asarray(adata.obsm["spatial"], dtype=np.float64) if "spatial" in adata.obsm else None
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


def _worker_init() -> None:
    torch.set_num_threads(1)


def _build_and_save(task: dict, adata=None) -> dict:
    """Read (if needed), build and save one slide; returns its manifest entry."""
    t0 = time.perf_counter()
    cfg = as_build_config(task["cfg"])
    spec = OmegaConf.merge(OmegaConf.structured(SlideSpec), task["spec"])
    if adata is None:
        adata = _read_slide(spec)
    data = build_slide_graph(
        adata,
        cfg,
        genes=task["genes"],
        slide_name=spec.name,
        slide_index=task["slide_index"],
        priors=task["priors"],
        progress=task.get("progress", False),
        config_hash=task["config_hash"],
    )
    save_graph(data, task["out_path"])
    nodes, edges = graph_counts(data)
    return {
        "name": spec.name,
        "file": Path(task["out_path"]).name,
        "n_spots": int(adata.n_obs),
        "config_hash": task["config_hash"],
        "slide_index": task["slide_index"],
        "node_counts": nodes,
        "edge_counts": edges,
        "prior_coverage": data.meta["prior_coverage"],
        "missing_genes": len(data.meta["missing_genes"]),
        "gene_ids": data.meta["gene_ids"],
        "patch_sizes_um": data.meta["patch_sizes_um"],
        "platform": data.meta["platform"],
        "panel_hash": task["panel_hash"],
        "data_spec": S.data_spec(data),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _versions() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import scipy
    import torch_geometric

    out = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
        "torch_geometric": torch_geometric.__version__,
    }
    for dist in ("anndata", "timm"):  # from metadata: no import, no deprecated __version__
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else ""
    if isinstance(exc, TissueGraphError):
        return text
    return f"{type(exc).__name__}: {text}"


# ----------------------------------------------------------------------------- build all
def build_graphs(
    cfg, *, force: bool = False, progress: bool = True, shard: tuple[int, int] | None = None
) -> dict:
    """Build one graph per slide of ``cfg`` into ``cfg.out_dir``.

    Parameters
    ----------
    cfg
        A :class:`~tissuegraph.graph.config.BuildConfig` (DictConfig or dataclass).
    force
        Rebuild slides whose graph is up to date.
    progress
        Show a progress bar over slides.
    shard
        ``(index, count)``: build only the slides ``i`` with ``i % count == index`` and write
        ``<out_dir>/manifest.shard-INDEX-of-COUNT.json`` instead of ``manifest.json``; every
        shard chooses the same panel from the fit slides. :func:`merge_shards` then writes
        ``manifest.json`` (and fits the standardisation statistics), identical to an
        unsharded build's.

    Returns
    -------
    The manifest (also written to ``<out_dir>/manifest.json``), with ``schema_version``,
    ``tissuegraph_version``, ``versions``, ``config_hash``, ``panel_hash``,
    ``build_config``, ``genes``, ``gene_ids``, ``pathways`` and ``slides`` (one entry per
    built slide: ``name``, ``file``, ``n_spots``, ``config_hash``, ``panel_hash``,
    ``data_spec`` (panel size, patch input and feature dims, edge types: what the trainer
    checks without opening the graph), ``node_counts``, ``edge_counts``,
    ``prior_coverage``).

    A slide that fails is reported by name on stderr and leaves no file; the other slides
    are still built, then :class:`~tissuegraph.errors.TissueGraphError` is raised.
    """
    cfg = as_build_config(cfg)
    validate_config(cfg)
    if not cfg.slides:
        raise ConfigError("slides: the config lists no slide")
    if shard is not None:
        shard = _check_shard(*shard)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = _plain(cfg)
    specs = {s["name"]: s for s in plain["slides"]}
    names = list(specs)
    old = None
    for where in ([shard_manifest_path(out_dir, *shard)] if shard else []) + [out_dir]:
        try:
            old = read_manifest(where)
            break
        except InputError:
            pass
    failures: dict[str, str] = {}

    # priors: read once, hashed by content
    tables = read_prior_tables(cfg.priors)
    prior_files = {k: file_hash(v) for k, v in tables.files.items()}

    # panel (reused from the manifest when its inputs are unchanged)
    pc = plain["panel"]
    fit = pc["fit_slides"] or names
    panel_inputs = [] if pc["mode"] == "list" else (fit if pc["mode"] == "hvg" else names)
    panel_key = stable_hash(
        {
            "panel": pc,
            "inputs": {n: [specs[n], _fingerprint(specs[n])] for n in panel_inputs if n in specs},
            "genes_file": file_hash(pc["genes_file"])
            if pc.get("genes_file") and Path(pc["genes_file"]).is_file()
            else None,
        }
    )
    n_jobs = int(cfg.n_jobs) if int(cfg.n_jobs) > 0 else (os.cpu_count() or 1)
    pool = None
    if n_jobs > 1 and len(names) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(
            min(n_jobs, len(names)), mp_context=mp.get_context("spawn"), initializer=_worker_init
        )
    try:
        return _build_all(
            cfg,
            plain,
            specs,
            names,
            old,
            panel_key,
            panel_inputs,
            tables,
            prior_files,
            failures,
            out_dir,
            pool,
            force,
            progress,
            shard,
        )
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _spec(d: dict) -> DictConfig:
    return OmegaConf.merge(OmegaConf.structured(SlideSpec), d)


def _build_all(
    cfg,
    plain,
    specs,
    names,
    old,
    panel_key,
    panel_inputs,
    tables,
    prior_files,
    failures,
    out_dir,
    pool,
    force,
    progress,
    shard=None,
) -> dict:
    adatas: dict = {}
    if old and old.get("panel_key") == panel_key and old.get("genes") and not force:
        genes = list(old["genes"])
    else:
        need = list(panel_inputs)
        unknown = [n for n in need if n not in specs]
        if unknown:
            raise ConfigError(f"panel.fit_slides: {unknown[0]!r} is not a slide of this config")
        if pool is not None and len(need) > 1:
            futs = {n: pool.submit(_read_slide, _spec(specs[n])) for n in need}
            results = {}
            for n, f in futs.items():
                try:
                    results[n] = (f.result(), None)
                except Exception as exc:
                    results[n] = (None, exc)
        else:
            results = {}
            for n in need:
                try:
                    results[n] = (_read_slide(_spec(specs[n])), None)
                except Exception as exc:
                    results[n] = (None, exc)
        for n in need:
            a, exc = results[n]
            if exc is not None:
                failures[n] = _one_line(exc)
                logger.warning("tissuegraph: slide %r failed: %s", n, failures[n])
            else:
                adatas[n] = a
        if need and not adatas:
            raise TissueGraphError(
                "no slide needed for the gene panel could be read: "
                + "; ".join(f"{k}: {v}" for k, v in failures.items())
            )
        genes = select_panel(adatas, cfg)
    pe = prior_edges(genes, tables, min_pathway_genes=int(cfg.priors.min_pathway_genes))
    phash = panel_hash(genes, pe.pathways)
    mine = set(shard_slides(names, *shard)) if shard else set(names)
    config_hash = stable_hash(
        {
            "options": _graph_options(cfg),
            "slides": plain["slides"],
            "genes": genes,
            "prior_files": prior_files,
        }
    )

    # per-slide tasks
    tasks, entries = [], {}
    old_entries = {e["name"]: e for e in (old or {}).get("slides", [])}
    for i, n in enumerate(names):
        if n in failures or n not in mine:
            continue
        h = slide_config_hash(
            cfg,
            specs[n],
            genes,
            pe.pathways,
            extra={"index": i, "inputs": _fingerprint(specs[n]), "prior_files": prior_files},
        )
        path = out_dir / f"{n}{S.GRAPH_SUFFIX}"
        prev = old_entries.get(n)
        if (
            not force
            and prev
            and prev.get("config_hash") == h
            and prev.get("data_spec")
            and path.is_file()
        ):
            entries[n] = prev
            continue
        tasks.append(
            {
                "cfg": plain,
                "spec": specs[n],
                "genes": genes,
                "slide_index": i,
                "priors": pe,
                "out_path": str(path),
                "config_hash": h,
                "panel_hash": phash,
            }
        )

    def manifest(complete: bool = False) -> dict:
        slides = [entries[n] for n in names if n in entries]
        gene_ids = next((e.get("gene_ids") for e in slides if e.get("gene_ids")), None)
        if gene_ids is None and old and old.get("genes") == list(genes):
            gene_ids = old.get("gene_ids")
        gene_ids = gene_ids or list(genes)
        out = {
            "schema_version": S.SCHEMA_VERSION,
            "tissuegraph_version": __version__,
            "versions": _versions(),
            "config_hash": config_hash,
            "panel_key": panel_key,
            "panel_hash": phash,
            "build_config": plain,
            "genes": list(genes),
            "gene_ids": list(gene_ids),
            "pathways": list(pe.pathways),
            "prior_coverage": pe.coverage,
            "prior_files": prior_files,
            "slides": [{k: v for k, v in e.items() if k != "gene_ids"} for e in slides],
            "failed": dict(failures),
            "standardize": std["stats"],
            "standardize_key": std["key"],
        }
        if shard:
            out["shard"] = {"index": shard[0], "count": shard[1], "complete": complete}
        return out

    def write(m: dict) -> None:
        if shard:
            write_json_atomic(shard_manifest_path(out_dir, *shard), m)
        else:
            write_manifest(out_dir, m)

    # standardisation statistics: fitted on the fit slides' graphs once they are built
    # (a sharded build leaves them to merge_shards, which sees every slide)
    std = {"stats": None, "key": None}
    if not shard:
        std = _reuse_standardization(old, plain, entries, names)
    bar = None
    if progress and tasks:
        from tissuegraph._utils import progress_bar

        bar = progress_bar(total=len(tasks), desc="build-graphs", unit="slide")

    def done(task, result=None, exc=None):
        name = task["spec"]["name"]
        if exc is not None:
            failures[name] = _one_line(exc)
            logger.warning("tissuegraph: slide %r failed: %s", name, failures[name])
        else:
            entries[name] = result
            write(manifest())
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(name)

    try:
        if pool is None:
            for task in tasks:
                name = task["spec"]["name"]
                task["progress"] = progress
                try:
                    res = _build_and_save(task, adatas.pop(name, None))
                except Exception as exc:
                    done(task, exc=exc)
                else:
                    done(task, res)
        else:
            from concurrent.futures import as_completed

            futs = {
                pool.submit(_build_and_save, t, adatas.pop(t["spec"]["name"], None)): t
                for t in tasks
            }
            for fut in as_completed(futs):
                try:
                    res = fut.result()
                except Exception as exc:
                    done(futs[fut], exc=exc)
                else:
                    done(futs[fut], res)
    finally:
        if bar is not None:
            bar.close()

    if not shard:
        std = _fit_standardization(out_dir, plain, entries, names, std)
    m = manifest(complete=True)
    if entries or old is not None or shard:  # a build that made nothing leaves no file behind
        write(m)  # both only when their content changed
        write_resolved_config(out_dir, cfg)
    if progress:
        n_built = sum(1 for t in tasks if t["spec"]["name"] in entries)
        n_skip = len(entries) - n_built
        logger.info(
            "build-graphs%s: %d built, %d up to date, %d failed -> %s",
            f" (shard {shard[0]}/{shard[1]})" if shard else "",
            n_built,
            n_skip,
            len(failures),
            out_dir,
        )
    _raise_failures(failures, len(mine), out_dir if entries else None)
    return m


def _raise_failures(failures: dict, n_slides: int, written: Path | None) -> None:
    if failures:
        first = next(iter(failures))
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        where = f"; the others were written to {written}" if written else ""
        raise TissueGraphError(
            f"{len(failures)} of {n_slides} slide(s) failed: {first}: {failures[first]}"
            f"{more}{where}"
        )


def _std_key(plain: dict, entries: dict, names: list[str]) -> str | None:
    nc = plain["normalize"]
    if not nc.get("scale", True):
        return None
    std_names = [n for n in (plain["panel"]["fit_slides"] or names) if n in names]
    hashes = [(entries.get(n) or {}).get("config_hash") for n in std_names]
    if None in hashes:
        return None
    return stable_hash({"slides": hashes, "n_pcs": nc.get("n_pcs"), "clip": nc.get("clip")})


def _reuse_standardization(old: dict | None, plain: dict, entries: dict, names) -> dict:
    """The old manifest's statistics when their key still matches (else none yet)."""
    key = _std_key(plain, entries, names)
    if old and old.get("standardize") and key and old.get("standardize_key") == key:
        return {"stats": old["standardize"], "key": key}
    return {"stats": None, "key": None}


def _fit_standardization(out_dir: Path, plain: dict, entries: dict, names, std: dict) -> dict:
    """Fit the standardisation statistics on the fit slides' graphs (when they changed)."""
    key = _std_key(plain, entries, names)
    if key is None or std.get("key") == key:
        return std
    from tissuegraph.graph.standardize import fit_standardization
    from tissuegraph.graph.storage import load_graph

    nc = plain["normalize"]
    std_names = [n for n in (plain["panel"]["fit_slides"] or names) if n in names]
    xs = [load_graph(out_dir / entries[n]["file"])[S.SPOT][S.X] for n in std_names]
    stats = fit_standardization(
        xs,
        n_pcs=int(nc.get("n_pcs") or 0),
        clip=float(nc.get("clip", 10.0)),
        seed=int(plain.get("seed", 0)),
        names=std_names,
    )
    return {"stats": stats, "key": key}


# ----------------------------------------------------------------------------- shards
SHARD_GLOB = "manifest.shard-*-of-*.json"


def panel_hash(genes: list[str], pathways: list[str]) -> str:
    """Hash of a build's panel (genes and pathway nodes, in order)."""
    return stable_hash({"genes": [str(g) for g in genes], "pathways": [str(p) for p in pathways]})


def _check_shard(index: int, count: int) -> tuple[int, int]:
    index, count = int(index), int(count)
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {index}/{count}: need 0 <= INDEX < COUNT (e.g. --shard 0/4)")
    return index, count


def parse_shard(text: str) -> tuple[int, int]:
    """``"INDEX/COUNT"`` -> ``(index, count)`` (as SLURM's ``$SLURM_ARRAY_TASK_ID`` /
    ``$SLURM_ARRAY_TASK_COUNT``, 0-based)."""
    try:
        a, b = str(text).split("/")
        return _check_shard(int(a), int(b))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected INDEX/COUNT, e.g. --shard 0/4") from None


def shard_slides(names: list[str], index: int, count: int) -> list[str]:
    """The slides of shard ``index`` of ``count``: every ``count``-th slide of the config."""
    return [n for i, n in enumerate(names) if i % count == index]


def shard_manifest_path(out_dir, index: int, count: int) -> Path:
    return Path(out_dir) / f"manifest.shard-{index:05d}-of-{count:05d}.json"


def merge_shards(out_dir, *, progress: bool = False) -> dict:
    """Merge the shard manifests of ``out_dir`` into ``manifest.json``.

    Every shard ``0 .. COUNT-1`` must be present and complete and have the same panel
    (``panel_hash``) and configuration (``config_hash``); the standardisation statistics are
    fitted here, on the fit slides' graphs, exactly as an unsharded build does. Raises
    :class:`~tissuegraph.errors.InputError` naming the offending shard file.
    """
    out_dir = Path(out_dir)
    files = sorted(out_dir.glob(SHARD_GLOB))
    if not files:
        raise InputError(f"{out_dir}: no {SHARD_GLOB}: run build-graphs --shard INDEX/COUNT first")
    shards = [(f, read_manifest(f)) for f in files]
    f0, m0 = shards[0]
    count = int((m0.get("shard") or {}).get("count", 0))
    by_index: dict[int, tuple[Path, dict]] = {}
    for f, m in shards:
        sh = m.get("shard") or {}
        if int(sh.get("count", -1)) != count:
            raise InputError(
                f"{f}: shard of a {sh.get('count')}-shard build but {f0.name} is of a "
                f"{count}-shard build: remove the stale shard files"
            )
        if not sh.get("complete"):
            raise InputError(f"{f}: shard {sh.get('index')} did not finish: run it again")
        if m.get("panel_hash") != m0.get("panel_hash"):
            raise InputError(
                f"{f}: gene panel (panel_hash {m.get('panel_hash')}) differs from {f0.name}'s "
                f"({m0.get('panel_hash')}): rebuild all shards with the same config"
            )
        if m.get("config_hash") != m0.get("config_hash"):
            raise InputError(
                f"{f}: built with a different config (config_hash {m.get('config_hash')}) "
                f"than {f0.name} ({m0.get('config_hash')}): rebuild all shards with one config"
            )
        by_index[int(sh["index"])] = (f, m)
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        raise InputError(
            f"{out_dir}: shard {missing[0]} of {count} is missing "
            f"({shard_manifest_path(out_dir, missing[0], count).name}): run it"
        )
    plain = m0["build_config"]
    names = [s["name"] for s in plain["slides"]]
    entries: dict = {}
    failures: dict = {}
    for _f, m in by_index.values():
        for e in m.get("slides", []):
            entries[e["name"]] = e
        failures.update(m.get("failed") or {})
    for e in entries.values():
        if e.get("panel_hash") != m0.get("panel_hash"):
            raise InputError(
                f"{out_dir / e['file']}: built with another gene panel (panel_hash "
                f"{e.get('panel_hash')}) than the shards ({m0.get('panel_hash')}): rebuild it"
            )
    try:
        old = read_manifest(out_dir)
    except InputError:
        old = None
    std = _reuse_standardization(old, plain, entries, names)
    std = _fit_standardization(out_dir, plain, entries, names, std)
    merged = {k: v for k, v in m0.items() if k != "shard"}
    merged["slides"] = [entries[n] for n in names if n in entries]
    merged["failed"] = {n: failures[n] for n in names if n in failures}
    merged["standardize"] = std["stats"]
    merged["standardize_key"] = std["key"]
    write_manifest(out_dir, merged)
    if progress:
        logger.info(
            "build-graphs --merge: %d shards, %d slides -> %s",
            count,
            len(merged["slides"]),
            out_dir / S.MANIFEST,
        )
    _raise_failures(merged["failed"], len(names), out_dir if entries else None)
    return merged
