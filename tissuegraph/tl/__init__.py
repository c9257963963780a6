"""Analysis on AnnData (scanpy style): embeddings, niches and their biology.

Every function takes an AnnData first, writes only the keys its docstring lists, records its
parameters under ``uns[key]["params"]`` and keeps squidpy's layout (``obsm["spatial"]``,
``obsp["spatial_connectivities"]``, ``uns["spatial"]``).
"""

from tissuegraph.tl import _model, _niches
from tissuegraph.tl._composition import niche_composition
from tissuegraph.tl._enrichment import exact_moments, nhood_enrichment
from tissuegraph.tl._explain import explain
from tissuegraph.tl._ligrec import ligand_receptor
from tissuegraph.tl._markers import niche_markers
from tissuegraph.tl._model import measured_vs_predicted, pearson_per_gene, pseudo_spots
from tissuegraph.tl._niches import consensus_labels, stability_curve
from tissuegraph.tl._pathways import pathway_activity
from tissuegraph.tl._sdata import accepts_spatialdata
from tissuegraph.tl._spatial import aggregate_neighbors, spatial_neighbors

# a SpatialData is converted at the entry (tissuegraph.io.read_spatialdata), results go back
embed = accepts_spatialdata(_model.embed)
niches = accepts_spatialdata(_niches.niches)
predict_expression = accepts_spatialdata(_model.predict_expression, returns_new=True)

__all__ = [
    "aggregate_neighbors",
    "consensus_labels",
    "embed",
    "exact_moments",
    "explain",
    "ligand_receptor",
    "measured_vs_predicted",
    "nhood_enrichment",
    "niche_composition",
    "niche_markers",
    "niches",
    "pathway_activity",
    "pearson_per_gene",
    "predict_expression",
    "pseudo_spots",
    "spatial_neighbors",
    "stability_curve",
]
