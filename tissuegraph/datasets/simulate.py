"""A synthetic tissue section on the 10x Visium lattice, with ground truth.

:func:`simulate_slide` generates a slide in exactly the AnnData layout of the real readers
(hexagonal Visium lattice, scanpy/squidpy ``uns["spatial"]``), so everything downstream runs
on it unchanged. The generative model, in order:

1. **Layout**: a star-shaped piece of tissue on the Visium hexagonal lattice (100 µm between
   spot centres, 55 µm spots; row ``r`` holds the columns of parity ``r % 2``).
2. **Niches**: layered bands along a warped axis (like cortical layers) plus irregular blobs
   (Voronoi cells of a few seeds in warped coordinates, like tumour nests or lymphoid
   aggregates). Both are smooth functions of the position in µm, so spots and image pixels
   sample the same map.
3. **Cell types**: each niche has a mixture of cell types (mixtures overlap between niches;
   two niches may share one and differ only in pathway state and texture); mixtures are
   blurred across niche borders and each spot draws its proportions from a Dirichlet.
4. **Expression**: every cell type activates its own transcription factors (TFs); a random
   signed sparse TF -> target network turns TF activity into target expression, and
   pathway-like gene modules respond to a niche- and position-dependent activity. A spot's
   mean profile is the proportion-weighted mixture of its cell types' profiles, modulated by
   the spot's own TF and pathway state; counts are negative binomial with a varying library
   size.
5. **Image** (optional): an H&E-like RGB image composed in optical density (Beer-Lambert):
   an eosin background whose intensity and fibre texture depend on the niche, and
   haematoxylin nuclei whose density, size, shape and colour depend on the cell type.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._layout import slide_anndata
from ..errors import InputError

SPOT_DIAMETER_UM = 55.0
SPOT_SPACING_UM = 100.0
ROW_PITCH_UM = SPOT_SPACING_UM * math.sqrt(3.0) / 2.0  # 86.6 µm between lattice rows
COL_PITCH_UM = SPOT_SPACING_UM / 2.0  # array_col step (columns alternate parity by row)
_SPOT_AREA_UM2 = SPOT_SPACING_UM * ROW_PITCH_UM  # area of one lattice cell
_MARGIN_UM = 150.0
_MAX_IMAGE_PIXELS = 400_000_000
_N_ORIENT = 8  # nucleus orientations in the sprite bank
_SIZES = (0.87, 1.0, 1.15)  # nucleus size multipliers in the sprite bank

# Optical density vectors (R, G, B) of haematoxylin and eosin (after Ruifrok & Johnston).
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
_EOSIN = np.array([0.10, 0.85, 0.35])
_BLUE_TINT = np.array([0.55, 0.45, 0.10])  # extra red/green absorption: bluer nuclei
_PINK_TINT = np.array([0.15, 0.60, 0.05])  # eosinophilic cytoplasm over the nucleus
_GLASS_OD = np.array([0.03, 0.035, 0.03])

__all__ = ["simulate_slide", "hex_lattice"]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _unit_normal(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


class _Field:
    """A smooth random field on the plane: a sum of random Fourier features (unit variance)."""

    def __init__(self, rng: np.random.Generator, length_scale: float, n_terms: int = 24):
        self.freq = rng.normal(size=(n_terms, 2)) / length_scale
        self.phase = rng.uniform(0.0, 2.0 * np.pi, size=n_terms)
        self.amp = np.full(n_terms, math.sqrt(2.0 / n_terms))

    def __call__(self, u: np.ndarray, v: np.ndarray, chunk: int = 262_144) -> np.ndarray:
        u = np.asarray(u, dtype=np.float32).ravel()
        v = np.asarray(v, dtype=np.float32).ravel()
        fx = self.freq[:, 0].astype(np.float32)
        fy = self.freq[:, 1].astype(np.float32)
        ph = self.phase.astype(np.float32)
        amp = self.amp.astype(np.float32)
        out = np.empty(u.shape[0], dtype=np.float64)
        for s in range(0, u.shape[0], chunk):
            arg = np.multiply.outer(u[s : s + chunk], fx)
            arg += np.multiply.outer(v[s : s + chunk], fy)
            arg += ph
            np.cos(arg, out=arg)
            out[s : s + chunk] = arg @ amp
        return out


def hex_lattice(n_spots: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Choose ``n_spots`` positions of a star-shaped tissue piece on the Visium lattice.

    Parameters
    ----------
    n_spots
        Number of spots to return.
    rng
        Random generator (sets the outline of the tissue).

    Returns
    -------
    ``(array_row, array_col)``, int64 arrays of length ``n_spots`` with ``array_col % 2 ==
    array_row % 2`` and both minima in ``{0, 1}``; sorted by row then column.
    """
    radius = math.sqrt(n_spots * _SPOT_AREA_UM2 / math.pi)  # µm, for a disc of that area
    aspect = rng.uniform(1.0, 1.35)
    half_w, half_h = 1.6 * radius * math.sqrt(aspect), 1.6 * radius / math.sqrt(aspect)
    n_rows = int(math.ceil(2 * half_h / ROW_PITCH_UM)) + 3
    n_cols = int(math.ceil(2 * half_w / COL_PITCH_UM)) + 3
    rows = np.repeat(np.arange(n_rows), (n_cols + 1 - (np.arange(n_rows) % 2)) // 2)
    # columns of parity row % 2 in every row
    starts = np.arange(n_rows) % 2
    counts = (n_cols + 1 - starts) // 2
    offsets = np.arange(rows.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    cols = np.repeat(starts, counts) + 2 * offsets
    x = (cols - n_cols / 2.0) * COL_PITCH_UM / math.sqrt(aspect)
    y = (rows - n_rows / 2.0) * ROW_PITCH_UM * math.sqrt(aspect)
    theta = np.arctan2(y, x)
    outline = np.ones_like(theta)
    for m in range(2, 6):
        outline += rng.uniform(0.02, 0.09) * np.cos(m * theta + rng.uniform(0, 2 * np.pi))
    rho = np.hypot(x, y) / outline
    keep = np.argpartition(rho, n_spots - 1)[:n_spots]
    r, c = rows[keep], cols[keep]
    r0 = r.min() - (r.min() % 2)
    c0 = c.min() - (c.min() % 2)
    r, c = r - r0, c - c0
    order = np.lexsort((c, r))
    return r[order].astype(np.int64), c[order].astype(np.int64)


def _blur_on_lattice(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, sigma_um: float
) -> np.ndarray:
    """Gaussian blur of per-spot values [N, K] over the lattice, restricted to the tissue."""
    from scipy.ndimage import gaussian_filter

    if sigma_um <= 0:
        return values.astype(np.float32)
    shape = (int(rows.max()) + 1, int(cols.max()) + 1)
    sig = (sigma_um / ROW_PITCH_UM, sigma_um / COL_PITCH_UM)
    mask = np.zeros(shape, dtype=np.float32)
    mask[rows, cols] = 1.0
    norm = gaussian_filter(mask, sig, mode="constant", truncate=3.0)[rows, cols]
    out = np.empty(values.shape, dtype=np.float32)
    grid = np.zeros(shape, dtype=np.float32)
    for k in range(values.shape[1]):
        grid[rows, cols] = values[:, k]
        out[:, k] = gaussian_filter(grid, sig, mode="constant", truncate=3.0)[rows, cols] / norm
    return out


# --------------------------------------------------------------------------------------------
# niches: a smooth map over the plane
# --------------------------------------------------------------------------------------------
class _NicheMap:
    """Niche identity as a function of the position in µm: warped bands plus blobs."""

    def __init__(
        self,
        rng: np.random.Generator,
        x_um: np.ndarray,
        y_um: np.ndarray,
        n_niches: int,
    ):
        self.center = np.array([x_um.mean(), y_um.mean()])
        self.scale = math.sqrt(x_um.shape[0] * _SPOT_AREA_UM2)  # ~ side of the tissue
        self.n_band = max(1, n_niches - n_niches // 2)
        self.n_blob = n_niches - self.n_band
        self.warp_u = _Field(rng, 0.35)
        self.warp_v = _Field(rng, 0.35)
        self.bend = _Field(rng, 0.5)
        self.edge = _Field(rng, 0.08)
        a = rng.uniform(0, np.pi)
        self.axis = np.array([math.cos(a), math.sin(a)])
        self.curvature = rng.uniform(-0.8, 0.8)
        # blobs: 1-3 seeds per blob niche at random spots, radii sharing ~1/n_niches of area
        seeds, radii, owner = [], [], []
        u, v = self._warped(x_um, y_um)
        for b in range(self.n_blob):
            m = int(rng.integers(1, 4))
            idx = rng.choice(u.shape[0], size=m, replace=False)
            r = math.sqrt(1.0 / (n_niches * m * math.pi)) * rng.uniform(0.8, 1.25, size=m)
            seeds.append(np.stack([u[idx], v[idx]], axis=1))
            radii.append(r)
            owner.append(np.full(m, self.n_band + b))
        self.seeds = np.concatenate(seeds) if seeds else np.zeros((0, 2))
        self.radii = np.concatenate(radii) if radii else np.zeros(0)
        self.owner = np.concatenate(owner) if owner else np.zeros(0, dtype=int)
        # band thresholds: equal shares of the spots not covered by blobs
        t = self._band_coord(u, v)
        blob = self._blob(u, v)
        free = t[blob < 0] if np.any(blob < 0) else t
        qs = np.linspace(0, 1, self.n_band + 1)[1:-1]
        self.thresholds = np.quantile(free, qs) if self.n_band > 1 else np.zeros(0)

    def _warped(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = (np.asarray(x, dtype=np.float64).ravel() - self.center[0]) / self.scale
        v = (np.asarray(y, dtype=np.float64).ravel() - self.center[1]) / self.scale
        return u + 0.07 * self.warp_u(u, v), v + 0.07 * self.warp_v(u, v)

    def _band_coord(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        along = u * self.axis[0] + v * self.axis[1]
        across = -u * self.axis[1] + v * self.axis[0]
        return along + self.curvature * across**2 + 0.05 * self.bend(u, v)

    def _blob(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = np.full(u.shape[0], -1, dtype=np.int64)
        if self.seeds.shape[0] == 0:
            return out
        ragged = 1.0 + 0.18 * self.edge(u, v)
        best = np.full(u.shape[0], np.inf)
        for s in range(self.seeds.shape[0]):
            d = np.hypot(u - self.seeds[s, 0], v - self.seeds[s, 1]) / (self.radii[s] * ragged)
            take = (d < 1.0) & (d < best)
            out[take] = self.owner[s]
            best[take] = d[take]
        return out

    def __call__(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Niche index (int64) at each position."""
        u, v = self._warped(x_um, y_um)
        niche = np.searchsorted(self.thresholds, self._band_coord(u, v)).astype(np.int64)
        blob = self._blob(u, v)
        return np.where(blob >= 0, blob, niche)


# --------------------------------------------------------------------------------------------
# programs: cell types, TFs, GRN, modules, niche mixtures (independent of the layout)
# --------------------------------------------------------------------------------------------
def _programs(
    rng: np.random.Generator,
    *,
    n_genes: int,
    n_niches: int,
    n_cell_types: int,
    n_tfs_per_type: int,
    n_modules: int,
    difficulty: float,
) -> dict:
    n_tf = n_cell_types * n_tfs_per_type
    n_target = n_genes - n_tf
    tf_names = [f"TF{i}" for i in range(n_tf)]
    gene_names = tf_names + [f"G{i}" for i in range(n_target)]
    tf_owner = np.repeat(np.arange(n_cell_types), n_tfs_per_type)

    # TF activity of each cell type [T, n_tf]: own TFs on, others near zero
    act = np.abs(rng.normal(0.0, 0.15, size=(n_cell_types, n_tf)))
    act[tf_owner, np.arange(n_tf)] = rng.uniform(1.2, 2.0, size=n_tf) * (1.0 - 0.3 * difficulty)

    # signed sparse TF -> target network
    src, dst, wts = [], [], []
    n_reg = np.minimum(rng.poisson(1.0, size=n_target) + 1, 3)
    n_reg[rng.random(n_target) < 0.15] = 0
    for j in range(n_target):
        regs = rng.choice(n_tf, size=n_reg[j], replace=False)
        sign = np.where(rng.random(n_reg[j]) < 0.7, 1.0, -1.0)
        w = sign * rng.uniform(0.45, 1.0, size=n_reg[j])
        src.extend(regs.tolist())
        dst.extend([n_tf + j] * n_reg[j])
        wts.extend(w.tolist())
    grn_src = np.asarray(src, dtype=np.int64)
    grn_dst = np.asarray(dst, dtype=np.int64)
    grn_w = np.asarray(wts, dtype=np.float64)
    W = np.zeros((n_tf, n_genes))
    W[grn_src, grn_dst] = grn_w
    # a TF's own mRNA follows its activity
    W[np.arange(n_tf), np.arange(n_tf)] = 1.0

    # pathway-like modules over target genes [M, G]
    Q = np.zeros((n_modules, n_genes))
    mod_src, mod_dst, mod_w = [], [], []
    for m in range(n_modules):
        size = int(min(n_target, rng.integers(12, 31)))
        members = n_tf + rng.choice(n_target, size=size, replace=False)
        w = rng.uniform(0.35, 0.9, size=size) * np.where(rng.random(size) < 0.15, -1.0, 1.0)
        Q[m, members] = w
        mod_src.extend([m] * size)
        mod_dst.extend(members.tolist())
        mod_w.extend(w.tolist())

    # gene baselines (log scale, heavy tailed) and dispersions
    base = rng.normal(0.0, 1.4, size=n_genes)
    base[:n_tf] = rng.normal(0.3, 0.5, size=n_tf)  # TFs: moderately expressed
    # per-gene dispersion on a grid of 8 levels (a scalar Gamma shape per level is fast)
    levels = (0.05 + 0.25 * difficulty) * np.exp(np.linspace(-0.8, 0.8, 8))
    dispersion = levels[rng.integers(0, 8, size=n_genes)]

    # cell-type profiles (before the spot state): exp(base + act @ W) [T, G]
    profiles = np.exp(base[None, :] + act @ W)

    # niche mixtures [K, T]: a dominant and a secondary type, plus background
    order = rng.permutation(n_cell_types)
    mix = np.full((n_niches, n_cell_types), 0.2 / max(n_cell_types - 2, 1))
    for k in range(n_niches):
        dom = order[k % n_cell_types]
        sec = order[(k + 1 + k // n_cell_types) % n_cell_types]
        if n_cell_types == 1:
            mix[k] = 1.0
            continue
        mix[k, dom] += 0.55
        mix[k, sec] += 0.25
    twin = None
    if n_niches >= 4 and n_cell_types >= 2:
        # the last niche shares niche 0's cell types: only pathways and texture tell them apart
        twin = (0, n_niches - 1)
        mix[n_niches - 1] = mix[0]
    mix /= mix.sum(1, keepdims=True)
    overlap = 0.3 + 0.65 * difficulty**0.7
    mix = (1 - overlap) * mix + overlap * mix.mean(0, keepdims=True)

    # niche pathway states [K, M]
    strength = 1.0 - 0.7 * difficulty
    niche_path = rng.normal(0.0, 0.5, size=(n_niches, n_modules)) * strength
    if twin is not None and n_modules >= 1:
        niche_path[twin[0], 0] = -strength
        niche_path[twin[1], 0] = +strength
        if n_modules >= 2:
            niche_path[twin[0], 1] = +strength
            niche_path[twin[1], 1] = -strength

    # morphology of each cell type (image): nuclei per lattice cell, size, shape, colour
    spread = 1.0 - 0.6 * difficulty
    kind = rng.permutation(n_cell_types)
    g = (kind / max(n_cell_types - 1, 1)) if n_cell_types > 1 else np.zeros(1)
    cells_per_spot = 38 + (rng.permutation(n_cell_types) / max(n_cell_types - 1, 1) - 0.5) * 40
    radius_um = 4.0 + (g - 0.5) * 3.0 * spread  # 2.5 .. 5.5 µm (before difficulty)
    elong = 1.0 + (rng.random(n_cell_types) < 0.35) * rng.uniform(1.0, 1.8, n_cell_types)
    darkness = 1.3 + (rng.permutation(n_cell_types) / max(n_cell_types - 1, 1) - 0.5) * spread
    tint = rng.uniform(-1.0, 1.0, n_cell_types) * spread
    colour = np.stack(
        [
            _unit_normal(_HEMATOXYLIN + max(t, 0) * _BLUE_TINT + max(-t, 0) * _PINK_TINT)
            for t in tint
        ]
    )

    # niche texture (image): eosin level, fibre orientation / period / amplitude
    tex_spread = 1.0 - 0.6 * difficulty
    eosin = 0.55 + rng.uniform(-0.25, 0.25, n_niches) * tex_spread
    fibre_angle = rng.uniform(0, np.pi, n_niches)
    fibre_period_um = rng.uniform(8.0, 30.0, n_niches)
    fibre_amp = rng.uniform(0.0, 0.45, n_niches) * tex_spread
    if twin is not None:
        fibre_amp[twin[0]], fibre_amp[twin[1]] = 0.05 * tex_spread, 0.45 * tex_spread
        eosin[twin[1]] = eosin[twin[0]] + 0.15 * tex_spread

    return {
        "gene_names": gene_names,
        "tf_names": tf_names,
        "tf_owner": tf_owner,
        "n_tf": n_tf,
        "act": act,
        "W": W,
        "Q": Q,
        "grn": (grn_src, grn_dst, grn_w),
        "modules": (np.asarray(mod_src), np.asarray(mod_dst), np.asarray(mod_w)),
        "base": base,
        "dispersion": dispersion,
        "profiles": profiles,
        "mix": mix,
        "twin": twin,
        "niche_path": niche_path,
        "cells_per_spot": cells_per_spot,
        "radius_um": radius_um,
        "elong": elong,
        "darkness": darkness,
        "colour": colour,
        "eosin": eosin,
        "fibre_angle": fibre_angle,
        "fibre_period_um": fibre_period_um,
        "fibre_amp": fibre_amp,
    }


# --------------------------------------------------------------------------------------------
# expression
# --------------------------------------------------------------------------------------------
def _counts(
    seed_seq: np.random.SeedSequence,
    prog: dict,
    props: np.ndarray,
    tf_state: np.ndarray,
    path_act: np.ndarray,
    libsize: np.ndarray,
    progress: bool,
) -> sp.csr_matrix:
    """Negative-binomial counts [N, G] (csr float32), generated in chunks of spots.

    Each chunk has its own random stream (spawned from ``seed_seq`` by chunk index), so the
    result does not depend on how many threads run the chunks.
    """
    from concurrent.futures import ThreadPoolExecutor

    n, n_genes = props.shape[0], prog["profiles"].shape[1]
    W_state = prog["W"].astype(np.float32)
    Q = prog["Q"].astype(np.float32)
    profiles = prog["profiles"].astype(np.float32)
    shape = (1.0 / prog["dispersion"]).astype(np.float32)
    groups = [(float(a), np.flatnonzero(shape == a)) for a in np.unique(shape)]
    chunk = max(1, 2_000_000 // n_genes)
    starts = list(range(0, n, chunk))
    streams = seed_seq.spawn(len(starts))

    def one(k: int):
        s = starts[k]
        e = min(n, s + chunk)
        rng = np.random.default_rng(streams[k])
        mu = props[s:e] @ profiles  # mixture of cell-type profiles
        mod = tf_state[s:e] @ W_state
        mod += path_act[s:e] @ Q
        np.exp(mod, out=mod)
        mu *= mod
        mu *= (libsize[s:e] / mu.sum(1))[:, None]
        # NB(mean mu, dispersion phi) as a Gamma-Poisson mixture
        lam = np.empty_like(mu)
        for a, cols in groups:
            lam[:, cols] = rng.standard_gamma(a, size=(e - s, cols.size), dtype=np.float32)
        lam *= mu
        lam /= shape
        flat = rng.poisson(lam).ravel()
        nz = np.flatnonzero(flat)
        data = flat[nz].astype(np.float32)
        indices = (nz % n_genes).astype(np.int32)
        per_row = np.bincount(nz // n_genes, minlength=e - s)
        return data, indices, per_row

    # Results are copied, in order, into buffers sized for the densest case: pages that are
    # never written are never committed, and each chunk is freed once copied, so the counts
    # are held only once.
    data = np.empty(n * n_genes, dtype=np.float32)
    indices = np.empty(n * n_genes, dtype=np.int32)
    per_row = np.empty(n, dtype=np.int64)
    at = 0
    workers = max(1, min(4, len(starts), _cpu_count()))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(one, range(len(starts)))
        if progress and len(starts) > 1:
            from tissuegraph._utils import progress_bar

            results = progress_bar(results, total=len(starts), desc="simulate counts", unit="chunk")
        for k, (d_k, i_k, r_k) in enumerate(results):
            data[at : at + d_k.size] = d_k
            indices[at : at + d_k.size] = i_k
            per_row[starts[k] : starts[k] + r_k.size] = r_k
            at += d_k.size
            del d_k, i_k, r_k
    data.resize(at, refcheck=False)  # shrinks in place
    indices.resize(at, refcheck=False)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(per_row, out=indptr[1:])
    if indptr[-1] < np.iinfo(np.int32).max:
        indptr = indptr.astype(np.int32)
    return sp.csr_matrix((data, indices, indptr), shape=(n, n_genes))


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# image
# --------------------------------------------------------------------------------------------
def _render_image(
    rng: np.random.Generator,
    prog: dict,
    niche_map: _NicheMap,
    x_um: np.ndarray,
    y_um: np.ndarray,
    props: np.ndarray,
    n_cells: np.ndarray,
    width_um: float,
    height_um: float,
    mpp: float,
    difficulty: float,
) -> np.ndarray:
    """An H&E-like RGB image (uint8 [H, W, 3]) at ``mpp`` µm per pixel."""
    from scipy.ndimage import gaussian_filter, zoom
    from scipy.spatial import cKDTree

    H = int(math.ceil(height_um / mpp))
    W = int(math.ceil(width_um / mpp))
    if H * W > _MAX_IMAGE_PIXELS:
        raise InputError(
            f"simulate_slide: the image would be {W}x{H} px; pass image=False or a larger "
            "microns_per_pixel"
        )
    # --- coarse maps (every `cs` px): niche and tissue mask -----------------------------
    cs = max(1, int(round(16.0 / mpp)))
    hc, wc = -(-H // cs), -(-W // cs)
    cy, cx = np.mgrid[0:hc, 0:wc].astype(np.float64)
    cxu, cyu = (cx.ravel() + 0.5) * cs * mpp, (cy.ravel() + 0.5) * cs * mpp
    dist, _ = cKDTree(np.stack([x_um, y_um], 1)).query(np.stack([cxu, cyu], 1))
    tissue_c = (dist <= 64.0).reshape(hc, wc)
    niche_c = niche_map(cxu, cyu).reshape(hc, wc)
    niche_c[~tissue_c] = 0
    warp_c = rng.normal(size=(hc, wc)).astype(np.float32)
    warp_c = gaussian_filter(warp_c, 2.0) * 6.0

    def up_nearest(a):
        return np.repeat(np.repeat(a, cs, 0), cs, 1)[:H, :W]

    niche = up_nearest(niche_c.astype(np.int16)).astype(np.intp)
    tissue = up_nearest(tissue_c)
    half = max(1, cs // 2)
    warp = zoom(warp_c, cs / half, order=1, prefilter=False)
    warp = np.repeat(np.repeat(warp, half, 0), half, 1)[:H, :W]
    if warp.shape != (H, W):  # zoom rounding
        warp = np.pad(warp, ((0, H - warp.shape[0]), (0, W - warp.shape[1])), mode="edge")

    # --- eosin background with niche texture --------------------------------------------
    k = 2.0 * np.pi * mpp / prog["fibre_period_um"]  # radians per pixel
    kx = (k * np.cos(prog["fibre_angle"])).astype(np.float32)
    ky = (k * np.sin(prog["fibre_angle"])).astype(np.float32)
    xx = np.arange(W, dtype=np.float32)[None, :]
    yy = np.arange(H, dtype=np.float32)[:, None]
    phase = kx[niche]
    phase *= xx
    phase += ky[niche] * yy
    phase += warp
    del warp
    np.sin(phase, out=phase)
    phase *= prog["fibre_amp"].astype(np.float32)[niche]
    phase += 1.0
    eosin = phase
    eosin *= prog["eosin"].astype(np.float32)[niche]
    noise = 0.04 + 0.08 * difficulty
    grain = rng.random((H, W), dtype=np.float32)
    grain -= 0.5
    grain *= 3.46 * noise  # uniform noise of standard deviation `noise`
    grain += 1.0
    eosin *= grain
    del grain
    eosin *= tissue
    del niche, tissue
    od = eosin[..., None] * _EOSIN.astype(np.float32)
    del eosin
    od += _GLASS_OD.astype(np.float32)

    # --- nuclei: one sprite per (cell type, size, orientation), stamped by bincount ---------
    spot = np.repeat(np.arange(props.shape[0]), n_cells)
    if spot.size:
        cum = np.cumsum(props, 1)
        u = rng.random(spot.size)
        ctype = np.minimum((u[:, None] > cum[spot]).sum(1), props.shape[1] - 1)
        px = (x_um[spot] + rng.uniform(-50.0, 50.0, spot.size)) / mpp
        py = (y_um[spot] + rng.uniform(-ROW_PITCH_UM / 2, ROW_PITCH_UM / 2, spot.size)) / mpp
        size_bin = np.digitize(rng.normal(0.0, 0.12, spot.size), [-0.07, 0.07])
        dark = (prog["darkness"][ctype] * np.exp(rng.normal(0.0, 0.15, spot.size))).astype(
            np.float32
        )
        ci = np.clip((py / cs).astype(np.int64), 0, hc - 1)
        cj = np.clip((px / cs).astype(np.int64), 0, wc - 1)
        theta = prog["fibre_angle"][niche_c[ci, cj]] + rng.normal(0.0, 0.35, spot.size)
        orient = (np.mod(theta, np.pi) / (np.pi / _N_ORIENT)).astype(np.int64) % _N_ORIENT
        n_types = props.shape[1]
        r_minor_t = prog["radius_um"] / mpp
        pad = int(math.ceil((r_minor_t * prog["elong"]).max() * _SIZES[-1])) + 1
        Wp, Hp = W + 2 * pad, H + 2 * pad
        base = (np.clip(np.rint(py).astype(np.int64), 0, H - 1) + pad) * Wp + (
            np.clip(np.rint(px).astype(np.int64), 0, W - 1) + pad
        )
        sprite = (ctype * len(_SIZES) + size_bin) * _N_ORIENT + orient
        order = np.argsort(sprite, kind="stable")
        bounds = np.searchsorted(sprite[order], np.arange(n_types * len(_SIZES) * _N_ORIENT + 1))
        idx_parts, w_parts, t_parts = [], [], []
        for sid in range(bounds.size - 1):
            members = order[bounds[sid] : bounds[sid + 1]]
            if members.size == 0:
                continue
            t, rest = divmod(sid, len(_SIZES) * _N_ORIENT)
            sb, ob = divmod(rest, _N_ORIENT)
            rel, wts = _sprite(
                r_minor_t[t] * _SIZES[sb],
                prog["elong"][t],
                (ob + 0.5) * np.pi / _N_ORIENT,
                Wp,
            )
            idx_parts.append((base[members, None] + rel[None, :]).ravel())
            w_parts.append((dark[members, None] * wts[None, :]).ravel())
            t_parts.append(np.full(members.size * rel.size, t, dtype=np.int8))
        idx = np.concatenate(idx_parts)
        w = np.concatenate(w_parts)
        tt = np.concatenate(t_parts)
        del idx_parts, w_parts, t_parts
        colour = prog["colour"].astype(np.float32)
        for ch in range(3):
            ink = np.bincount(idx, weights=w * colour[tt, ch], minlength=Hp * Wp)
            od[..., ch] += ink.reshape(Hp, Wp)[pad : pad + H, pad : pad + W]
        del idx, w, tt
    np.negative(od, out=od)
    np.exp(od, out=od)
    od *= 255.0
    return np.clip(od + 0.5, 0, 255).astype(np.uint8)


def _sprite(r_minor: float, elong: float, theta: float, stride: int):
    """Pixels of one soft elliptic nucleus: flat offsets (row-major, ``stride``) and weights."""
    r_major = r_minor * elong
    R = int(math.ceil(r_major)) + 1
    oy, ox = np.mgrid[-R : R + 1, -R : R + 1].astype(np.float64)
    c, s = math.cos(theta), math.sin(theta)
    a = (ox * c + oy * s) / r_major
    b = (oy * c - ox * s) / r_minor
    q = np.sqrt(a * a + b * b)
    w = np.clip((1.0 - q) * r_minor + 0.5, 0.0, 1.0) * (0.75 + 0.25 * q)  # darker rim
    keep = w > 0
    rel = (oy[keep] * stride + ox[keep]).astype(np.int64)
    return rel, w[keep].astype(np.float32)


def _downsample(img: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    from PIL import Image

    H, W = img.shape[:2]
    scale = min(1.0, max_side / max(H, W))
    if scale >= 1.0:
        return img.copy(), 1.0
    w, h = max(1, int(round(W * scale))), max(1, int(round(H * scale)))
    out = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BOX))
    return out, w / W


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def simulate_slide(
    n_spots: int = 2000,
    *,
    n_genes: int = 300,
    n_niches: int = 5,
    n_cell_types: int = 6,
    n_tfs_per_type: int = 3,
    n_modules: int = 6,
    seed: int = 0,
    image: bool = True,
    microns_per_pixel: float = 2.0,
    difficulty: float = 0.5,
    library_size: float | None = None,
    library_id: str = "synthetic",
    lowres_max_side: int = 600,
    progress: bool = False,
):
    """Simulate a Visium-like tissue section with niches, cell types, a GRN and an H&E image.

    The slide has exactly the layout of :func:`tissuegraph.io.read_visium` (hexagonal Visium
    lattice, 100 µm spacing, 55 µm spots) and carries its generative ground truth.

    Parameters
    ----------
    n_spots
        Number of spots (all in tissue).
    n_genes
        Number of genes: ``n_cell_types * n_tfs_per_type`` TFs (``"TF0"``, ...) first, then
        target genes (``"G0"``, ...).
    n_niches
        Number of niches: about half are layered bands, the rest irregular blobs. With 4 or
        more niches, the last one has the same cell-type mixture as niche 0 and differs only
        in pathway activity (expression) and texture (image).
    n_cell_types
        Number of cell types (``"CT0"``, ...), each with its own TFs and nucleus morphology.
    n_tfs_per_type
        TFs activated by each cell type.
    n_modules
        Pathway-like gene modules (``"PW0"``, ...) whose activity depends on the niche and
        position.
    seed
        Random seed; the same seed gives the same slide, and the expression does not depend
        on ``image``.
    image
        Render an H&E-like image (``uns["spatial"][library_id]["images"]``: ``hires`` at
        full resolution, ``tissue_hires_scalef = 1``, and a ``lowres`` downsample).
    microns_per_pixel
        Resolution of the full-resolution image.
    difficulty
        In ``[0, 1]``: how hard the niches are to recover. Raises the overlap of niche
        mixtures, the noise of the proportions, of TF and pathway states, the NB
        dispersion, the blur across niche borders, and lowers the contrast of cell-type
        morphology and niche texture. At the default 0.5 a PCA + spatial smoothing + GMM
        baseline reaches an ARI of about 0.5 (see ``docs/datasets.md``).
    library_size
        Typical total counts per spot (varies log-normally and with cell density); default
        ``4 * n_genes``.
    library_id
        Key in ``uns["spatial"]``.
    lowres_max_side
        Longest side of the ``lowres`` image in pixels.
    progress
        Show progress bars on large slides.

    Returns
    -------
    AnnData ``n_spots x n_genes`` with raw counts in ``X`` (csr float32) and

    - ``obs``: ``in_tissue``, ``array_row``, ``array_col``, ``true_niche`` (categorical),
      ``true_n_cells`` (nuclei in the spot's lattice cell), ``total_counts_expected``;
    - ``obsm``: ``spatial`` (full-res px, x = column, y = row), ``spatial_um``,
      ``true_proportions`` (DataFrame, one column per cell type), ``true_tf_activity``
      (float32 [N, n_tfs]), ``true_pathway_activity`` (float32 [N, n_modules]);
    - ``var``: ``gene_ids``, ``is_tf``;
    - ``uns["spatial"][library_id]``: ``images``, ``scalefactors``, ``metadata``;
    - ``uns["tissuegraph"]``: platform ``"synthetic"``, grid ``"hex"``, ``microns_per_pixel``;
    - ``uns["simulation"]``: ``params``, ``cell_types``, ``niches``, ``niche_kind``,
      ``tfs``, ``tf_cell_type``, ``niche_mixtures``, ``niche_pathway_activity``,
      ``grn`` and ``pathways`` (dicts of ``source``/``target``/``weight`` lists, usable as
      prior tables), ``twin_niches``.
    """

    from .. import __version__

    t0 = time.perf_counter()
    n_spots = int(n_spots)
    if n_spots < 10:
        raise InputError(f"simulate_slide: n_spots={n_spots}; use at least 10 spots")
    if not 0.0 <= float(difficulty) <= 1.0:
        raise InputError(f"simulate_slide: difficulty={difficulty}; use a value in [0, 1]")
    if n_niches < 1 or n_cell_types < 1 or n_tfs_per_type < 1 or n_modules < 0:
        raise InputError(
            "simulate_slide: n_niches, n_cell_types and n_tfs_per_type must be >= 1, n_modules >= 0"
        )
    n_tf = n_cell_types * n_tfs_per_type
    if n_genes < n_tf + 10:
        raise InputError(
            f"simulate_slide: n_genes={n_genes} is too small for {n_tf} TFs; use n_genes >= "
            f"{n_tf + 10} or fewer cell types / TFs per type"
        )
    if microns_per_pixel <= 0:
        raise InputError(f"simulate_slide: microns_per_pixel={microns_per_pixel} must be > 0")
    d = float(difficulty)
    library_size = 4.0 * n_genes if library_size is None else float(library_size)
    mpp = float(microns_per_pixel)
    ss = np.random.SeedSequence(int(seed))
    s_layout, s_niche, s_prog, s_prop, s_expr, s_image = ss.spawn(6)
    r_layout, r_niche, r_prog, r_prop, r_image = (
        np.random.default_rng(s) for s in (s_layout, s_niche, s_prog, s_prop, s_image)
    )

    # layout ------------------------------------------------------------------------------
    rows, cols = hex_lattice(n_spots, r_layout)
    x_um = _MARGIN_UM + cols * COL_PITCH_UM
    y_um = _MARGIN_UM + rows * ROW_PITCH_UM
    width_um = float(x_um.max() + _MARGIN_UM)
    height_um = float(y_um.max() + _MARGIN_UM)

    # niches, programs ----------------------------------------------------------------------
    niche_map = _NicheMap(r_niche, x_um, y_um, n_niches)
    niche = niche_map(x_um, y_um)
    prog = _programs(
        r_prog,
        n_genes=n_genes,
        n_niches=n_niches,
        n_cell_types=n_cell_types,
        n_tfs_per_type=n_tfs_per_type,
        n_modules=n_modules,
        difficulty=d,
    )

    # proportions, states -------------------------------------------------------------------
    onehot = np.zeros((n_spots, n_niches), dtype=np.float32)
    onehot[np.arange(n_spots), niche] = 1.0
    soft = _blur_on_lattice(rows, cols, onehot, sigma_um=50.0 + 110.0 * d)
    del onehot
    mean_mix = soft @ prog["mix"].astype(np.float32)
    conc = 2.0 + 30.0 * (1.0 - 0.8 * d)
    props = r_prop.standard_gamma(conc * mean_mix + 1e-3, dtype=np.float32)
    del mean_mix
    props /= props.sum(1, keepdims=True)
    n_cells = r_prop.poisson(props @ prog["cells_per_spot"].astype(np.float32))

    scale = math.sqrt(n_spots * _SPOT_AREA_UM2)
    u, v = (x_um - x_um.mean()) / scale, (y_um - y_um.mean()) / scale
    tf_noise = 0.2 + 0.35 * d
    tf_state = r_prop.normal(0.0, tf_noise, size=(n_spots, n_tf)).astype(np.float32)
    tf_activity = props @ prog["act"].astype(np.float32) + tf_state
    path_act = soft @ prog["niche_path"].astype(np.float32)
    for m in range(n_modules):
        path_act[:, m] += (0.35 * _Field(r_prop, 0.25)(u, v)).astype(np.float32)
    path_act += r_prop.normal(0.0, 0.15 + 0.3 * d, size=path_act.shape).astype(np.float32)
    del soft

    density = n_cells / max(float(np.mean(n_cells)), 1e-6)
    libsize = (
        library_size
        * np.exp(r_prop.normal(0.0, 0.25 + 0.2 * d, size=n_spots))
        * (0.5 + 0.5 * density)
    ).astype(np.float32)

    X = _counts(s_expr, prog, props, tf_state, path_act, libsize, progress)

    # AnnData -------------------------------------------------------------------------------
    cell_types = [f"CT{i}" for i in range(n_cell_types)]
    niche_names = [f"niche{i}" for i in range(n_niches)]
    names = pd.Index([f"r{a}_c{b}" for a, b in zip(rows.tolist(), cols.tolist())])
    spatial_um = np.stack([x_um, y_um], 1).astype(np.float64)
    images = {}
    scalefactors = {
        "spot_diameter_fullres": SPOT_DIAMETER_UM / mpp,
        "fiducial_diameter_fullres": 1.5 * SPOT_DIAMETER_UM / mpp,
        "tissue_hires_scalef": 1.0,
        "tissue_lowres_scalef": 1.0,
    }
    if image:
        img = _render_image(
            r_image, prog, niche_map, x_um, y_um, props, n_cells, width_um, height_um, mpp, d
        )
        low, low_scale = _downsample(img, lowres_max_side)
        images = {"hires": img, "lowres": low}
        scalefactors["tissue_lowres_scalef"] = float(low_scale)
    else:
        scalefactors["tissue_lowres_scalef"] = float(
            min(1.0, lowres_max_side / max(width_um / mpp, height_um / mpp))
        )
    adata = slide_anndata(
        X,
        obs_names=names,
        var_names=prog["gene_names"],
        gene_ids=prog["gene_names"],
        in_tissue=np.ones(n_spots, dtype=np.int64),
        array_row=rows,
        array_col=cols,
        spatial_px=spatial_um / mpp,
        spatial_um=spatial_um,
        microns_per_pixel=mpp,
        library_id=library_id,
        platform="synthetic",
        spot_diameter_um=SPOT_DIAMETER_UM,
        spot_spacing_um=SPOT_SPACING_UM,
        grid="hex",
        image_path=None,
        source=f"simulate_slide(n_spots={n_spots}, seed={int(seed)})",
        images=images,
        scalefactors=scalefactors,
        metadata={
            "source": "tissuegraph.datasets.simulate_slide",
            "chemistry_description": "synthetic Visium-like",
            "software_version": f"tissuegraph {__version__}",
        },
        extra_obs=pd.DataFrame(
            {
                "true_niche": pd.Categorical.from_codes(niche, categories=niche_names),
                "true_n_cells": n_cells.astype(np.int64),
                "total_counts_expected": libsize,
            },
            index=names,
        ),
        extra_var=pd.DataFrame({"is_tf": np.arange(n_genes) < n_tf}),
    )
    adata.obsm["true_proportions"] = pd.DataFrame(props, index=names, columns=cell_types)
    adata.obsm["true_tf_activity"] = tf_activity.astype(np.float32)
    adata.obsm["true_pathway_activity"] = path_act.astype(np.float32)
    grn_src, grn_dst, grn_w = prog["grn"]
    mod_src, mod_dst, mod_w = prog["modules"]
    gn = np.asarray(prog["gene_names"])
    module_names = np.asarray([f"PW{i}" for i in range(n_modules)])
    adata.uns["simulation"] = {
        "params": {
            "n_spots": n_spots,
            "n_genes": int(n_genes),
            "n_niches": int(n_niches),
            "n_cell_types": int(n_cell_types),
            "n_tfs_per_type": int(n_tfs_per_type),
            "n_modules": int(n_modules),
            "seed": int(seed),
            "image": bool(image),
            "microns_per_pixel": mpp,
            "difficulty": d,
            "library_size": float(library_size),
        },
        "cell_types": cell_types,
        "niches": niche_names,
        "niche_kind": ["band"] * niche_map.n_band + ["blob"] * niche_map.n_blob,
        "twin_niches": list(prog["twin"]) if prog["twin"] is not None else [],
        "tfs": list(prog["tf_names"]),
        "tf_cell_type": [cell_types[i] for i in prog["tf_owner"]],
        "pathway_names": module_names.tolist(),
        "niche_mixtures": prog["mix"].astype(np.float64),
        "niche_pathway_activity": prog["niche_path"].astype(np.float64),
        "grn": {
            "source": gn[grn_src].tolist(),
            "target": gn[grn_dst].tolist(),
            "weight": grn_w.astype(np.float64),
        },
        "pathways": {
            "source": module_names[mod_src].tolist() if n_modules else [],
            "target": gn[mod_dst].tolist() if n_modules else [],
            "weight": mod_w.astype(np.float64),
        },
        "elapsed_s": float(time.perf_counter() - t0),
    }
    return adata
