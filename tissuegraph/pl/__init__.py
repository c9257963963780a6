"""Plots of :mod:`tissuegraph.tl` results (matplotlib; return the Figure/Axes, ``save=`` a
PNG/PDF path)."""

from tissuegraph.pl._plots import (
    composition,
    expression_maps,
    nhood_enrichment,
    niche_maps,
    niches,
    read_metrics,
    save_niche_figures,
    savefig,
    spatial_scatter,
    stability,
    training_curves,
)

__all__ = [
    "composition",
    "expression_maps",
    "nhood_enrichment",
    "niche_maps",
    "niches",
    "read_metrics",
    "save_niche_figures",
    "savefig",
    "spatial_scatter",
    "stability",
    "training_curves",
]
