"""The gene panel shared by the slides of a build: :func:`select_panel`."""

from __future__ import annotations

from pathlib import Path

from tissuegraph._genes import dedup_ci, upper_set
from tissuegraph.errors import ConfigError, InputError
from tissuegraph.graph.build import as_build_config
from tissuegraph.graph.genes import as_csr, select_hvg

__all__ = ["select_panel"]


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
        genes = dedup_ci(genes)
        if not genes:
            raise ConfigError("panel.mode=list needs panel.genes or panel.genes_file")
        return genes
    if not adatas:
        raise InputError("no slides could be read to choose the gene panel")
    if pc.mode == "all":
        names = list(adatas)
        first = [str(g) for g in adatas[names[0]].var_names]
        common = upper_set(first)
        for n in names[1:]:
            common &= upper_set(adatas[n].var_names)
        genes = dedup_ci(g for g in first if g.upper() in common)
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
