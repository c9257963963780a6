"""``build-graphs``: slides -> one ``HeteroData`` per slide + ``manifest.json``.

:func:`build_graphs` reads every slide of a :class:`~tissuegraph.graph.config.BuildConfig`,
chooses the shared gene panel (:func:`~tissuegraph.graph.panel.select_panel`), builds each
slide's graph (:func:`~tissuegraph.graph.build.build_slide_graph`, in parallel over slides)
and writes ``<out_dir>/<slide>.pt``, ``manifest.json`` and the resolved ``config.yaml``, all
atomically. Slides whose file is up to date (same configuration hash) are skipped.

The orchestration is a :class:`BuildPlan`: ``from_config -> select_panel -> tasks -> run``.
Building one slide lives in :mod:`tissuegraph.graph.build`, the panel in
:mod:`tissuegraph.graph.panel`; their public names are re-exported here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from tissuegraph import __version__
from tissuegraph._logging import logger
from tissuegraph._utils import file_hash, stable_hash, write_json_atomic
from tissuegraph.config import with_defaults
from tissuegraph.errors import ConfigError, InputError, TissueGraphError
from tissuegraph.graph import schema as S
from tissuegraph.graph.build import (  # noqa: F401  (re-exported: imported from here)
    PANEL_MODES,
    _array_rc,
    _grid_kind,
    _options,
    _plain,
    _positions_um,
    _read_slide,
    as_build_config,
    build_slide_graph,
    graph_counts,
    graph_options,
    options_hash,
    slide_config_hash,
    validate_config,
)
from tissuegraph.graph.config import SlideSpec
from tissuegraph.graph.panel import select_panel
from tissuegraph.graph.priors import PriorEdges, PriorTables, prior_edges, read_prior_tables
from tissuegraph.graph.storage import (
    read_manifest,
    save_graph,
    write_manifest,
    write_resolved_config,
)

__all__ = [
    "BuildPlan",
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


# ----------------------------------------------------------------------------- one task
def _worker_init() -> None:
    torch.set_num_threads(1)


def _build_and_save(task: dict, adata=None) -> dict:
    """Read (if needed), build and save one slide; returns its manifest entry."""
    t0 = time.perf_counter()
    spec = _spec(task["spec"])
    if adata is None:
        adata = _read_slide(spec)
    data = build_slide_graph(  # converts the plain config once
        adata,
        task["cfg"],
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
    return BuildPlan.from_config(cfg, force=force, progress=progress, shard=shard).run()


def _spec(d: dict) -> DictConfig:
    return with_defaults(SlideSpec, d)


@dataclass
class BuildPlan:
    """One build: the resolved config, its slides, the shard, the panel once chosen.

    ``BuildPlan.from_config(cfg).run()`` is :func:`build_graphs`. :meth:`run` chooses the
    panel (:meth:`select_panel`, reused from the old manifest when its inputs are
    unchanged), lists the slides to (re)build (:meth:`tasks`), builds them and writes the
    manifest.
    """

    cfg: DictConfig
    plain: dict
    options: dict
    specs: dict[str, dict]
    out_dir: Path
    old: dict | None
    tables: PriorTables
    prior_files: dict
    panel_inputs: list[str]
    panel_key: str
    shard: tuple[int, int] | None = None
    force: bool = False
    progress: bool = True
    failures: dict[str, str] = field(default_factory=dict)
    # set by select_panel()
    genes: list[str] | None = None
    priors: PriorEdges | None = None
    panel_hash: str | None = None
    config_hash: str | None = None
    adatas: dict = field(default_factory=dict)

    @classmethod
    def from_config(
        cls, cfg, *, force: bool = False, progress: bool = True, shard=None
    ) -> BuildPlan:
        """Resolve and check ``cfg``, read the old manifest and the prior tables."""
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
                "inputs": {
                    n: [specs[n], _fingerprint(specs[n])] for n in panel_inputs if n in specs
                },
                "genes_file": file_hash(pc["genes_file"])
                if pc.get("genes_file") and Path(pc["genes_file"]).is_file()
                else None,
            }
        )
        return cls(
            cfg=cfg,
            plain=plain,
            options=_options(plain),
            specs=specs,
            out_dir=out_dir,
            old=old,
            tables=tables,
            prior_files=prior_files,
            panel_inputs=list(panel_inputs),
            panel_key=panel_key,
            shard=shard,
            force=force,
            progress=progress,
        )

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    @property
    def mine(self) -> set[str]:
        """The slides this build (or shard) is responsible for."""
        return set(shard_slides(self.names, *self.shard)) if self.shard else set(self.names)

    def run(self) -> dict:
        """Choose the panel, build the slides that are not up to date, write the manifest."""
        n_jobs = int(self.cfg.n_jobs) if int(self.cfg.n_jobs) > 0 else (os.cpu_count() or 1)
        pool = None
        if n_jobs > 1 and len(self.names) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(
                min(n_jobs, len(self.names)),
                mp_context=mp.get_context("spawn"),
                initializer=_worker_init,
            )
        try:
            self.select_panel(pool)
            return self._execute(pool)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    def select_panel(self, pool=None) -> list[str]:
        """The panel (from the old manifest, else read the panel's slides and choose it)."""
        old, failures = self.old, self.failures
        if old and old.get("panel_key") == self.panel_key and old.get("genes") and not self.force:
            genes = list(old["genes"])
        else:
            need = list(self.panel_inputs)
            unknown = [n for n in need if n not in self.specs]
            if unknown:
                raise ConfigError(f"panel.fit_slides: {unknown[0]!r} is not a slide of this config")
            results = {}
            if pool is not None and len(need) > 1:
                futs = {n: pool.submit(_read_slide, _spec(self.specs[n])) for n in need}
                for n, f in futs.items():
                    try:
                        results[n] = (f.result(), None)
                    except Exception as exc:
                        results[n] = (None, exc)
            else:
                for n in need:
                    try:
                        results[n] = (_read_slide(_spec(self.specs[n])), None)
                    except Exception as exc:
                        results[n] = (None, exc)
            for n in need:
                a, exc = results[n]
                if exc is not None:
                    failures[n] = _one_line(exc)
                    logger.warning("tissuegraph: slide %r failed: %s", n, failures[n])
                else:
                    self.adatas[n] = a
            if need and not self.adatas:
                raise TissueGraphError(
                    "no slide needed for the gene panel could be read: "
                    + "; ".join(f"{k}: {v}" for k, v in failures.items())
                )
            genes = select_panel(self.adatas, self.cfg)
        pe = prior_edges(
            genes, self.tables, min_pathway_genes=int(self.cfg.priors.min_pathway_genes)
        )
        self.genes, self.priors = genes, pe
        self.panel_hash = panel_hash(genes, pe.pathways)
        self.config_hash = options_hash(
            self.options, slides=self.plain["slides"], genes=genes, prior_files=self.prior_files
        )
        return genes

    def tasks(self) -> tuple[list[dict], dict]:
        """The slides to build (one task each) and the manifest entries of those up to date."""
        if self.genes is None:
            self.select_panel()
        tasks, entries = [], {}
        mine = self.mine
        old_entries = {e["name"]: e for e in (self.old or {}).get("slides", [])}
        # each task carries its own slide spec: the slide list stays out of the per-slide
        # config (converting or pickling it per slide would cost O(slides) each)
        slide_cfg = {**self.plain, "slides": []}
        for i, n in enumerate(self.names):
            if n in self.failures or n not in mine:
                continue
            spec = self.specs[n]
            h = slide_config_hash(
                self.cfg,
                spec,
                self.genes,
                self.priors.pathways,
                extra={"index": i, "inputs": _fingerprint(spec), "prior_files": self.prior_files},
                options=self.options,
            )
            path = self.out_dir / f"{n}{S.GRAPH_SUFFIX}"
            prev = old_entries.get(n)
            if (
                not self.force
                and prev
                and prev.get("config_hash") == h
                and prev.get("data_spec")
                and path.is_file()
            ):
                entries[n] = prev
                continue
            tasks.append(
                {
                    "cfg": slide_cfg,
                    "spec": spec,
                    "genes": self.genes,
                    "slide_index": i,
                    "priors": self.priors,
                    "out_path": str(path),
                    "config_hash": h,
                    "panel_hash": self.panel_hash,
                }
            )
        return tasks, entries

    def manifest(self, entries: dict, std: dict, complete: bool = False) -> dict:
        """The manifest of the slides in ``entries``."""
        old, genes, pe = self.old, self.genes, self.priors
        slides = [entries[n] for n in self.names if n in entries]
        gene_ids = next((e.get("gene_ids") for e in slides if e.get("gene_ids")), None)
        if gene_ids is None and old and old.get("genes") == list(genes):
            gene_ids = old.get("gene_ids")
        gene_ids = gene_ids or list(genes)
        out = {
            "schema_version": S.SCHEMA_VERSION,
            "tissuegraph_version": __version__,
            "versions": _versions(),
            "config_hash": self.config_hash,
            "panel_key": self.panel_key,
            "panel_hash": self.panel_hash,
            "build_config": self.plain,
            "genes": list(genes),
            "gene_ids": list(gene_ids),
            "pathways": list(pe.pathways),
            "prior_coverage": pe.coverage,
            "prior_files": self.prior_files,
            "slides": [{k: v for k, v in e.items() if k != "gene_ids"} for e in slides],
            "failed": dict(self.failures),
            "standardize": std["stats"],
            "standardize_key": std["key"],
        }
        if self.shard:
            out["shard"] = {"index": self.shard[0], "count": self.shard[1], "complete": complete}
        return out

    def _write(self, m: dict) -> None:
        if self.shard:
            write_json_atomic(shard_manifest_path(self.out_dir, *self.shard), m)
        else:
            write_manifest(self.out_dir, m)

    def _execute(self, pool) -> dict:
        tasks, entries = self.tasks()
        failures, names, plain, out_dir = self.failures, self.names, self.plain, self.out_dir
        adatas, shard, progress = self.adatas, self.shard, self.progress

        # standardisation statistics: fitted on the fit slides' graphs once they are built
        # (a sharded build leaves them to merge_shards, which sees every slide)
        std = {"stats": None, "key": None}
        if not shard:
            std = _reuse_standardization(self.old, plain, entries, names)
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
                self._write(self.manifest(entries, std))
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
        m = self.manifest(entries, std, complete=True)
        if entries or self.old is not None or shard:  # a build that made nothing leaves no file
            self._write(m)  # both only when their content changed
            write_resolved_config(out_dir, self.cfg)
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
        _raise_failures(failures, len(self.mine), out_dir if entries else None)
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
