"""Readers: Space Ranger (Visium / Visium HD), legacy ST, h5ad; lazy slide images; priors.

Every reader returns the AnnData layout described in ``docs/io.md`` (squidpy-compatible).
"""

from tissuegraph.io.detect import detect_format, read_any, read_slide
from tissuegraph.io.h5ad import read_h5ad, write_h5ad
from tissuegraph.io.image import SlideImage, image_shape, open_image, read_thumbnail
from tissuegraph.io.priors import (
    match_genes,
    prior_coverage,
    read_gmt,
    read_ligand_receptor,
    read_pathways,
    read_tf_targets,
)
from tissuegraph.io.sdata import read_spatialdata, to_spatialdata
from tissuegraph.io.st import read_st
from tissuegraph.io.visium import read_10x_h5, read_10x_mtx, read_positions, read_visium

__all__ = [
    "SlideImage",
    "detect_format",
    "image_shape",
    "match_genes",
    "open_image",
    "prior_coverage",
    "read_10x_h5",
    "read_10x_mtx",
    "read_any",
    "read_gmt",
    "read_h5ad",
    "read_ligand_receptor",
    "read_pathways",
    "read_positions",
    "read_slide",
    "read_spatialdata",
    "read_st",
    "read_tf_targets",
    "read_thumbnail",
    "read_visium",
    "to_spatialdata",
    "write_h5ad",
]
