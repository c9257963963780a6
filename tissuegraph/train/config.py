"""Configuration of ``tissuegraph pretrain`` (structured OmegaConf dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tissuegraph.nn.config import ImageEncoderConfig, ModelConfig

__all__ = ["PretrainConfig", "ObjectiveConfig", "TrainConfig", "ModelConfig", "ImageEncoderConfig"]


@dataclass
class ObjectiveConfig:
    """Weights of the self-supervised terms (0 removes a term and its compute).

    ``contrastive``: image <-> expression InfoNCE of a spot's expression-side and ``patch_0``
    image-side embeddings; ``patch_region``: InfoNCE of ``patch_k`` and its parent
    ``patch_k+1``; ``localisation``: 9-way cell of a patch in its parent; ``masked_expression``:
    MSE of the normalised expression of hidden spots. ``mask_ratio``: fraction of a tile's spots
    whose expression is hidden; ``contrastive_fraction``: fraction of the tile's spots used as
    contrastive anchors (disjoint from the hidden ones). ``temperature_init`` /
    ``temperature_min``: the learnable InfoNCE temperature and its lower clamp.
    ``max_region_pairs`` / ``max_loc_pairs``: per-tile caps on children used by the two
    patch terms. ``image_expression``: MSE of the core spots' expression decoded with the
    expression of every spot of the tile hidden (the image -> expression task itself; one
    extra forward pass per step). ``local_global_hops``: the local-global summary of a spot
    averages its neighbours' embeddings over this many hops (1: the adjacent spots).
    """

    contrastive: float = 1.0
    patch_region: float = 0.5
    localisation: float = 0.5
    masked_expression: float = 1.0
    mask_ratio: float = 0.25
    contrastive_fraction: float = 0.5
    temperature_init: float = 0.07
    temperature_min: float = 0.01
    max_region_pairs: int = 512
    max_loc_pairs: int = 2048
    local_global: float = 0.0
    local_global_hops: int = 1
    masked_feature: float = 0.0
    reconstruction: float = 0.0
    mae_gamma: float = 2.0
    image_expression: float = 0.0


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping.

    ``batch_spots``: spots per spatial tile (before the halo). ``warmup_steps``: linear warm-up,
    then cosine decay to ``min_lr_ratio * lr`` at ``max_steps`` (more than ``max_steps / 5`` is
    clamped to ``max_steps // 5`` with a warning). ``device``: ``auto`` (CUDA when
    available), ``cpu``, ``cuda``, ``cuda:N``. ``precision``: ``auto`` (bf16 autocast on CUDA,
    fp32 on CPU), ``bf16`` or ``fp32``. ``compile``: ``torch.compile`` the model.
    ``log_every`` / ``eval_every`` / ``ckpt_every``: steps between metric rows, held-out
    evaluations and checkpoints (0: only at the end). ``keep_step_checkpoints``: also keep
    ``step_N.pt`` at every ``ckpt_every``. ``ckpt_every_min``: also checkpoint when this many
    minutes have passed since the last checkpoint (0: off). ``val_fraction``: fraction of each
    slide's tiles held out. ``max_eval_tiles``: held-out tiles used per evaluation.
    ``threads``: torch intra-op threads per process; 0 (auto) shares the CPUs of the affinity
    mask among the local ranks (``LOCAL_WORLD_SIZE``). ``max_cached_slides``: a graph folder
    of more slides than this is read on demand (memory-mapped, at most this many slides open
    per process, the tiles of that many slides shuffled together, and under DDP each rank
    reading only its own share of the slides); a smaller folder is loaded whole at start
    (0: always load whole). Resuming needs the same value.
    ``keep_best``: a held-out metric (lower is better, e.g. ``val_image_expression`` or
    ``val_loss``): ``checkpoints/best.pt`` is written at each evaluation that improves it
    (null: off). ``probe``: at the end of training, fit the image -> expression linear probe
    (:mod:`tissuegraph.train.probe`) on the training spots and store it in ``last.pt`` (and
    ``best.pt``); needs graphs with patches. ``probe_max_spots``: spots it is fitted on at
    most (a random subset beyond).
    """

    max_steps: int = 1000
    batch_spots: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    log_every: int = 10
    eval_every: int = 200
    ckpt_every: int = 500
    keep_step_checkpoints: bool = False
    ckpt_every_min: float = 10.0
    threads: int = 0
    max_cached_slides: int = 64
    num_workers: int = 0
    val_fraction: float = 0.1
    max_eval_tiles: int = 32
    csv: bool = False
    tensorboard: bool = True
    keep_best: str | None = None
    probe: bool = True
    probe_max_spots: int = 50000


@dataclass
class PretrainConfig:
    """``tissuegraph pretrain``: ``graphs`` is a ``build-graphs`` output folder; everything is
    written under ``run_dir``."""

    graphs: str = "graphs"
    run_dir: str = "runs/pretrain"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
