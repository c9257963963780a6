"""Datasets: the synthetic tissue simulator and named public datasets from a local folder.

- :func:`simulate_slide`: a Visium-like slide with niches, cell types, a gene regulatory
  program and an H&E-like image, with its ground truth (the embedded default demo slide).
- :func:`data_dir`, :func:`dlpfc`, :func:`dlpfc_labels`, :func:`dlpfc_sections`, :func:`her2st`,
  :func:`her2st_proportions`, :func:`priors_dir`: real public data resolved from
  ``$TISSUEGRAPH_DATA``.
- :func:`read_slide`: one slide of a build config, simulated (``synthetic``) or read.
"""

from .real import (
    DLPFC_SAMPLES,
    DLPFC_STANDARD,
    HER2ST_SECTIONS,
    data_dir,
    dlpfc,
    dlpfc_labels,
    dlpfc_sections,
    her2st,
    her2st_proportions,
    priors_dir,
    read_slide,
)
from .simulate import hex_lattice, simulate_slide

__all__ = [
    "simulate_slide",
    "hex_lattice",
    "data_dir",
    "dlpfc",
    "dlpfc_labels",
    "her2st",
    "her2st_proportions",
    "priors_dir",
    "read_slide",
    "DLPFC_SAMPLES",
    "DLPFC_STANDARD",
    "dlpfc_sections",
    "HER2ST_SECTIONS",
]
