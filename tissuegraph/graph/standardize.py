"""Per-gene standardisation (and an optional PCA basis) fitted on the fit slides only.

The graphs store normalised expression (``spot.x``, e.g. log1p CP10k). The model sees it
standardised with statistics fitted on ``panel.fit_slides`` alone:

.. math::
    z = \\mathrm{clip}\\big((x - \\mu) / \\sigma, -c, c\\big), \\qquad
    z_{\\mathrm{pca}} = z\\,B \\quad (B: [G, k] \\text{ leading right singular vectors})

The statistics live in the manifest (``manifest["standardize"]``) and, once a model is
trained, in its checkpoint (buffers of the expression encoder), so that a new slide is
embedded with exactly the training statistics. Nothing of a held-out slide reaches them.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["fit_standardization", "standardization_tensors"]


def fit_standardization(
    xs: list, *, n_pcs: int = 50, clip: float = 10.0, seed: int = 0, names: list[str] | None = None
) -> dict:
    """Per-gene mean / sd over the spots of ``xs`` (the fit slides) and a PCA basis.

    Parameters
    ----------
    xs
        One ``[N_i, G]`` array or tensor of normalised expression per fit slide.
    n_pcs
        Principal components of the standardised expression (0: no basis).
    clip
        Standardised values are clipped to ``[-clip, clip]`` before the PCA (and by the model).
    seed
        Seed of the randomised SVD.
    names
        The fit slides' names (recorded).

    Returns
    -------
    A JSON-serialisable dict: ``fit_slides``, ``n_spots``, ``clip``, ``n_pcs``, ``mean``
    ``[G]``, ``sd`` ``[G]`` (genes with zero variance get 1), ``pca`` ``[G, k]`` (or ``None``)
    and ``pca_variance_ratio`` ``[k]``.
    """
    mats = [
        np.asarray(x.float().numpy() if torch.is_tensor(x) else x, dtype=np.float64) for x in xs
    ]
    x = np.concatenate(mats, 0)
    mean = x.mean(0)
    sd = x.std(0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    out = {
        "fit_slides": list(names or []),
        "n_spots": int(x.shape[0]),
        "clip": float(clip),
        "mean": mean.astype(np.float32).tolist(),
        "sd": sd.astype(np.float32).tolist(),
        "n_pcs": 0,
        "pca": None,
        "pca_variance_ratio": None,
    }
    k = int(min(n_pcs, x.shape[0] - 1, x.shape[1]))
    if k > 0:
        z = np.clip((x - mean) / sd, -clip, clip)
        z -= z.mean(0)
        g = torch.Generator().manual_seed(int(seed))
        zt = torch.from_numpy(z)
        # randomised range finder + exact SVD of the small projection (deterministic per seed)
        q = min(zt.shape[1], k + 20)
        omega = torch.randn(zt.shape[1], q, generator=g, dtype=zt.dtype)
        y = zt @ omega
        for _ in range(4):
            y, _ = torch.linalg.qr(y)
            y = zt @ (zt.T @ y)
        qm, _ = torch.linalg.qr(y)
        _, s, vt = torch.linalg.svd(qm.T @ zt, full_matrices=False)
        basis = vt[:k].T.numpy()
        # a sign convention so that the basis does not flip with the seed
        flip = np.sign(basis[np.abs(basis).argmax(0), np.arange(k)])
        basis = basis * flip
        total = float((z**2).sum())
        out["n_pcs"] = k
        out["pca"] = basis.astype(np.float32).tolist()
        out["pca_variance_ratio"] = (s[:k].numpy() ** 2 / max(total, 1e-12)).tolist()
    return out


def standardization_tensors(stats: dict | None) -> dict[str, torch.Tensor] | None:
    """``mean``, ``sd`` (``[G]``) and ``basis`` (``[G, k]`` or ``None``) as float32 tensors."""
    if not stats:
        return None
    out = {
        "mean": torch.tensor(stats["mean"], dtype=torch.float32),
        "sd": torch.tensor(stats["sd"], dtype=torch.float32),
        "basis": None,
    }
    if stats.get("pca"):
        out["basis"] = torch.tensor(stats["pca"], dtype=torch.float32)
    return out
