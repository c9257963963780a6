"""Multi-scale image patches: the containment hierarchy, pixel crops and frozen-encoder features.

``patch_0`` is centred on every spot. ``patch_k`` (k >= 1) tiles the slide on a square
lattice of side ``sizes_um[k]`` anchored at ``origin_um``; because each side is three times
the previous one and all lattices share the origin, every lattice cell lies in exactly one
cell of the next scale, at one of the 3x3 positions ``loc = 3 * row + col`` (row along +y,
col along +x). Only cells that contain a child are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tissuegraph.errors import ConfigError

__all__ = [
    "PatchHierarchy",
    "validate_sizes",
    "patch_hierarchy",
    "crop_patches",
    "encode_patches",
    "colour_statistics",
    "standardize_per_slide",
    "COLOUR_STATS",
]


@dataclass
class PatchHierarchy:
    """Patch centres and containment edges.

    Attributes
    ----------
    sizes_um
        Side length of each scale, finest first.
    pos
        ``pos[k]``: ``float64 [M_k, 2]`` patch centres in µm (``pos[0]`` = spot centres).
    cells
        ``cells[k]``: ``int64 [M_k, 2]`` lattice cell (x, y) of each patch (``cells[0]`` is
        the finest sub-cell of side ``sizes_um[1] / 3`` holding the spot centre).
    parent
        ``parent[k]``: ``int64 [M_k]`` index of the ``patch_{k+1}`` containing patch ``i``.
    loc
        ``loc[k]``: ``int64 [M_k]`` in 0..8, the child's cell in the parent's 3x3 grid.
    """

    sizes_um: list[float]
    origin_um: np.ndarray
    pos: list[np.ndarray] = field(default_factory=list)
    cells: list[np.ndarray] = field(default_factory=list)
    parent: list[np.ndarray] = field(default_factory=list)
    loc: list[np.ndarray] = field(default_factory=list)

    @property
    def n_levels(self) -> int:
        return len(self.pos)


def validate_sizes(sizes_um) -> list[float]:
    """Check that the patch sides grow by exactly 3x; returns them as floats."""
    sizes = [float(s) for s in sizes_um]
    if not sizes:
        raise ConfigError("patches.sizes_um is empty: give at least one side length in µm")
    if any(s <= 0 for s in sizes):
        raise ConfigError(f"patches.sizes_um must be positive, got {sizes}")
    for a, b in zip(sizes[:-1], sizes[1:]):
        if not math.isclose(b, 3.0 * a, rel_tol=1e-6):
            raise ConfigError(
                f"patches.sizes_um={sizes}: each scale must be 3x the previous one "
                f"({b} != 3 x {a}); e.g. [110, 330, 990]"
            )
    return sizes


def _unique_rows(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique integer (x, y) rows, ordered by y then x; returns (uniq, first_index, inverse)."""
    lo = cells.min(0)
    c = cells - lo
    width = int(c[:, 0].max()) + 1
    key = c[:, 1] * width + c[:, 0]
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    return cells[first], first, inv.reshape(-1)


def patch_hierarchy(spot_pos_um: np.ndarray, sizes_um, origin_um=(0.0, 0.0)) -> PatchHierarchy:
    """Lay out the patch scales over the spots and compute the containment edges.

    Parameters
    ----------
    spot_pos_um
        ``[N, 2]`` spot centres (x, y) in µm; ``patch_0`` row ``i`` is spot ``i``.
    sizes_um
        Side lengths, finest first; ``sizes_um[k+1] == 3 * sizes_um[k]``.
    origin_um
        Common origin (x, y) of the coarse lattices.

    Returns
    -------
    :class:`PatchHierarchy` with ``len(sizes_um)`` levels.
    """
    sizes = validate_sizes(sizes_um)
    pos0 = np.asarray(spot_pos_um, dtype=np.float64)
    origin = np.asarray(origin_um, dtype=np.float64).reshape(2)
    h = PatchHierarchy(sizes_um=sizes, origin_um=origin)
    h.pos.append(pos0)
    if len(sizes) == 1 or len(pos0) == 0:
        h.cells.append(np.zeros((len(pos0), 2), np.int64))
        return h
    # finest sub-cells (side sizes[1] / 3), then integer division by 3 per level, so the
    # nesting holds exactly whatever the floating-point rounding at cell borders
    sub = np.floor((pos0 - origin) / (sizes[1] / 3.0)).astype(np.int64)
    h.cells.append(sub)
    per_spot = sub
    first_prev = None
    for k in range(1, len(sizes)):
        per_spot = per_spot // 3  # cell at scale k of each spot
        uniq, first, inv = _unique_rows(per_spot)
        child_cells = h.cells[k - 1]
        # parent of each level-(k-1) node: the level-k cell of its first spot
        parent = inv if k == 1 else inv[first_prev]
        loc = 3 * np.mod(child_cells[:, 1], 3) + np.mod(child_cells[:, 0], 3)
        h.parent.append(parent.astype(np.int64))
        h.loc.append(loc.astype(np.int64))
        h.cells.append(uniq)
        h.pos.append(origin + (uniq.astype(np.float64) + 0.5) * sizes[k])
        first_prev = first
    return h


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def crop_patches(
    image,
    centers_px: np.ndarray,
    size_px: float,
    out_px: int,
    *,
    batch_size: int = 4096,
    progress: bool = False,
    desc: str = "crops",
) -> np.ndarray:
    """Square crops around ``centers_px`` resized to ``out_px``: ``uint8 [M, 3, S, S]``.

    ``image`` is a ``SlideImage`` (``tissuegraph.io.open_image``); centres and ``size_px``
    are in full-resolution pixels. Regions outside the image are zero.
    """
    centers_px = np.asarray(centers_px, dtype=np.float64)
    m = len(centers_px)
    out = np.zeros((m, 3, out_px, out_px), dtype=np.uint8)
    it = _batches(m, batch_size)
    if progress and m > batch_size:
        from tissuegraph._utils import progress_bar

        it = progress_bar(list(it), desc=desc, leave=False)
    for a, b in it:
        crop = np.asarray(image.crop(centers_px[a:b], float(size_px), int(out_px)))
        out[a:b] = crop.transpose(0, 3, 1, 2)
    return out


def load_encoder(spec):
    """A frozen timm model (``num_classes=0``) in eval mode, plus its mean/std.

    ``spec.name``: a timm name or ``hf-hub:<org>/<repo>``; ``spec.checkpoint_path``: local
    weights (UNI / Virchow / H-optimus files, ...), read by
    :func:`tissuegraph._timm.create_backbone`. Without weights the random init is seeded
    (seed 0), so that separate builds encode with the same network."""
    import torch

    from tissuegraph._timm import create_backbone
    from tissuegraph.errors import TissueGraphError, require

    require("timm", purpose="patch features")
    try:
        # random init is seeded: every build (training slides now, a new slide later) must
        # encode with the same network
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create_backbone(
                spec.name,
                pretrained=bool(spec.pretrained),
                checkpoint_path=str(spec.checkpoint_path) if spec.checkpoint_path else None,
                model_kwargs=dict(getattr(spec, "model_kwargs", None) or {}),
            )
    except TissueGraphError as exc:
        raise ConfigError(f"patches.encoder: {exc}") from exc
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    return model, mean, std


#: names of the :func:`colour_statistics` columns
COLOUR_STATS = tuple(
    f"{stat}_{ch}" for stat in ("mean", "sd") for ch in ("r", "g", "b", "h", "s", "v")
)


def colour_statistics(crops: np.ndarray) -> np.ndarray:
    """Mean and standard deviation of R, G, B, H, S, V of each crop: ``float32 [M, 12]``.

    ``crops``: uint8 ``[M, H, W, 3]`` (channels last); values in [0, 1] (hue as a fraction of
    the circle). Column names: :data:`COLOUR_STATS`.
    """
    x = np.asarray(crops, dtype=np.float32) / 255.0
    m = x.reshape(x.shape[0], -1, 3)
    r, g, b = m[..., 0], m[..., 1], m[..., 2]
    v = m.max(-1)
    c = v - m.min(-1)
    s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
    safe = np.maximum(c, 1e-12)
    h = np.where(
        v == r, ((g - b) / safe) % 6.0, np.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    h = np.where(c > 0, h / 6.0, 0.0)
    chans = [r, g, b, h, s, v]
    out = [ch.mean(1) for ch in chans] + [ch.std(1) for ch in chans]
    return np.stack(out, 1).astype(np.float32)


def standardize_per_slide(feat: np.ndarray) -> np.ndarray:
    """Each column centred and scaled by its mean / sd over the slide's patches (one scale).

    A stain / scanner normalisation that uses only the slide's own image: features of
    sections stained or scanned on different days become comparable. Constant columns
    become 0."""
    f = np.asarray(feat, dtype=np.float32)
    if f.shape[0] == 0:
        return f
    mu = f.mean(0, keepdims=True)
    sd = f.std(0, keepdims=True)
    return np.where(sd > 1e-6, (f - mu) / np.maximum(sd, 1e-6), 0.0).astype(np.float32)


def encode_patches(
    image,
    centers_px: np.ndarray,
    size_px: float,
    spec,
    *,
    input_px: int,
    model=None,
    progress: bool = False,
    desc: str = "features",
) -> np.ndarray:
    """Features of a frozen timm encoder for each crop: ``float16 [M, D]``.

    Crops are read ``spec.batch_size`` at a time at ``input_px`` pixels, scaled to [0, 1],
    normalised with the model's mean/std and encoded under ``torch.no_grad``. With
    ``spec.colour_stats`` the 12 :func:`colour_statistics` of the same crop are appended
    (``D = num_features + 12``).
    """
    import torch

    if model is None:
        model, mean, std = load_encoder(spec)
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
    from tissuegraph._utils import resolve_device

    with_colour = bool(getattr(spec, "colour_stats", False))
    device = resolve_device(spec.device)
    model = model.to(device)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    centers_px = np.asarray(centers_px, dtype=np.float64)
    m = len(centers_px)
    feats = []
    it = _batches(m, max(1, int(spec.batch_size)))
    if progress and m > spec.batch_size:
        from tissuegraph._utils import progress_bar

        it = progress_bar(list(it), desc=desc, leave=False)
    with torch.no_grad():
        for a, b in it:
            crop = np.asarray(image.crop(centers_px[a:b], float(size_px), int(input_px)))
            colour = colour_statistics(crop) if with_colour else None
            x = torch.from_numpy(crop).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            x = (x - mean_t) / std_t
            f = model(x)
            if f.ndim > 2:
                f = f.flatten(1)
            f = f.float().cpu().numpy()
            if colour is not None:
                f = np.concatenate([f, colour], 1)
            feats.append(f.astype(np.float16))
    if not feats:
        dim = int(getattr(model, "num_features", 0)) + (len(COLOUR_STATS) if with_colour else 0)
        return np.zeros((0, dim), dtype=np.float16)
    return np.concatenate(feats)
