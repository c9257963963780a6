"""Configuration of ``tissuegraph build-graphs`` (structured OmegaConf dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SlideSpec:
    """One slide. ``format`` picks the reader.

    - ``visium``: ``path`` is a Space Ranger output folder; ``image_path`` an optional
      full-resolution image (TIFF/BigTIFF, JPEG, PNG).
    - ``st``: legacy Spatial Transcriptomics: ``counts`` (spots x genes tsv[.gz]), ``spots``
      (spot table) and ``image`` (full-resolution H&E).
    - ``h5ad``: ``path`` is an ``.h5ad`` in the scanpy/squidpy layout. ``expression`` says
      what its ``X`` holds: ``raw`` integer counts (default) or ``normalized`` expression,
      accepted only when set here (then choose ``normalize.method: none``).
    - ``synthetic``: the simulated demo slide; ``n_spots`` and ``seed`` choose its size.
    """

    name: str = "???"
    format: str = "visium"
    path: str | None = None
    counts: str | None = None
    spots: str | None = None
    image: str | None = None
    image_path: str | None = None
    library_id: str | None = None
    expression: str = "raw"
    n_spots: int = 2000
    seed: int = 0


@dataclass
class PanelConfig:
    """The gene panel shared by all slides of a build.

    ``mode``: ``hvg`` (``n_top`` highly variable genes, chosen on ``fit_slides`` or all
    slides), ``list`` (``genes`` or one symbol per line in ``genes_file``), ``all`` (genes
    present in every slide).

    ``flavor`` (hvg only): ``seurat_v3`` (standardised variance of raw counts against a
    mean-variance trend, ranked per slide, median rank across slides) or ``dispersion``
    (normalised dispersion of log-normalised data within mean bins). Genes must be detected
    in at least ``min_spots`` spots of every fitted slide.
    """

    mode: str = "hvg"
    n_top: int = 2000
    genes: list[str] | None = None
    genes_file: str | None = None
    fit_slides: list[str] | None = None
    min_spots: int = 3
    flavor: str = "seurat_v3"


@dataclass
class NormalizeConfig:
    """``log1p_cp10k`` (library-size to ``target_sum`` then log1p), ``log1p``, or ``none``.

    ``scale``: fit a per-gene mean / sd of the normalised expression on ``panel.fit_slides``
    only (all slides when unset), stored in the manifest and, after pretraining, in the
    checkpoint; the model standardises its expression input (clipped at ``±clip``) with it, on
    every slide, new ones included. ``n_pcs``: also fit a PCA basis of the standardised
    expression (0: none); the expression encoder then starts from the ``n_pcs`` components.
    """

    method: str = "log1p_cp10k"
    target_sum: float = 1e4
    scale: bool = True
    n_pcs: int = 50
    clip: float = 10.0


@dataclass
class SpatialConfig:
    """Spot graph: ``grid`` (lattice rings from array coordinates: 6 neighbours per ring on
    Visium's hexagonal lattice, 4/8 on a square ST lattice), ``knn``, ``radius``, ``delaunay``.

    ``square_neighbors`` (4 or 8) picks the square-lattice neighbourhood; ``max_length_um``
    prunes longer Delaunay edges (default: twice the median nearest-neighbour distance)."""

    method: str = "grid"
    rings: int = 1
    k: int = 6
    radius_um: float | None = None
    square_neighbors: int = 4
    max_length_um: float | None = None


@dataclass
class EncoderSpec:
    """A frozen timm encoder whose features are stored instead of pixels (``name`` null = pixels).

    ``name``: a timm model or ``hf-hub:<org>/<repo>``; ``pretrained`` downloads its weights
    (network or a filled cache); ``checkpoint_path`` loads a local weights file instead
    (e.g. UNI: ``name: vit_large_patch16_224``, ``checkpoint_path: .../pytorch_model.bin``,
    ``model_kwargs: {init_values: 1.0e-5, dynamic_img_size: true}``, ``input_px: 224``).
    Crops are read at ``input_px`` (default: ``patches.crop_px``), normalised with the
    model's mean/std and encoded in batches of ``batch_size`` under ``torch.no_grad``.
    ``colour_stats``: append mean / sd of R, G, B, H, S, V of the same crop (12 columns).
    ``slide_standardize``: standardise every feature column per slide and scale (mean 0,
    sd 1 over the slide's patches): a stain / scanner normalisation from the slide's own
    image, applied alike to new slides built with the same config."""

    name: str | None = None
    pretrained: bool = False
    checkpoint_path: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    colour_stats: bool = False
    slide_standardize: bool = False
    batch_size: int = 64
    device: str = "auto"
    input_px: int | None = None


@dataclass
class PatchConfig:
    """Image patches: side lengths in µm, finest first, each 3x the previous one.

    ``patch_0`` is centred on every spot; coarser scales lie on square lattices anchored at
    ``origin_um`` (µm from the image's top-left corner). ``crop_px``: pixel side of the stored
    uint8 crops (3 x 32 x 32 = 3 KB per patch)."""

    enabled: bool = True
    sizes_um: list[float] = field(default_factory=lambda: [110.0, 330.0, 990.0])
    crop_px: int = 32
    origin_um: list[float] = field(default_factory=lambda: [0.0, 0.0])
    encoder: EncoderSpec = field(default_factory=EncoderSpec)


@dataclass
class PriorConfig:
    """Prior-knowledge tables (paths; ``null`` to leave out). Formats are detected from the
    header; ``tf_format`` may force ``collectri`` or ``dorothea``."""

    tf_targets: str | None = None
    tf_format: str = "auto"
    dorothea_levels: str = "ABC"
    pathways: str | None = None
    gmt: str | None = None
    ligand_receptor: str | None = None
    min_pathway_genes: int = 3
    expresses_top_k: int = 32


@dataclass
class BuildConfig:
    slides: list[SlideSpec] = field(default_factory=list)
    out_dir: str = "graphs"
    n_jobs: int = 1
    seed: int = 0
    keep_counts: bool = False
    panel: PanelConfig = field(default_factory=PanelConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    spatial: SpatialConfig = field(default_factory=SpatialConfig)
    patches: PatchConfig = field(default_factory=PatchConfig)
    priors: PriorConfig = field(default_factory=PriorConfig)
