"""The image -> expression linear probe stored with a checkpoint.

At the end of pretraining (``train.probe``, on by default for graphs with patches) a ridge
regression from image-side features to the panel's normalised expression is fitted on the
training slides and stored under ``"probe"`` in ``checkpoints/last.pt`` (and ``best.pt``).
``tl.predict_expression(..., method="probe")`` applies it to new slides.

Features of a spot (:func:`probe_features`), all computed without any expression:

- the image features of its ``patch_0`` and of the ``patch_1``, ``patch_2``, ... cells that
  contain it (stored frozen-encoder features, or the model's backbone features of the pixels):
  spot, region and wider region, as TRIPLEX does;
- the mean of those over the spot's neighbours in the spot graph;
- the model's fused embedding with the expression of every spot hidden (what the
  ``image_expression`` decoder reads).

The fit: standardise every column, PCA to ``n_pcs`` components, ridge regression with the
penalty chosen among ``alphas`` by cross-validation grouped by slide (leave one training slide
out; contiguous spot blocks when there is one slide). Everything is fitted on the training
slides only and stored as tensors (``torch.load(weights_only=True)`` reads it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch_geometric.data import HeteroData

from tissuegraph.errors import InputError
from tissuegraph.graph import schema as S

__all__ = ["probe_features", "fit_probe", "apply_probe", "attach_probe", "ALPHAS"]

log = logging.getLogger("tissuegraph.train")

#: ridge penalties tried by the cross-validation
ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 13))
PROBE_VERSION = 1


def _patch_ancestors(data: HeteroData, n_scales: int) -> list[np.ndarray]:
    """``out[k][i]``: the ``patch_k`` node containing spot ``i`` (``out[0]`` = identity)."""
    n = int(data[S.patch(0)].num_nodes)
    idx = np.arange(n)
    out = [idx]
    for k in range(n_scales - 1):
        et = S.patch_in_parent(k)
        if et not in data.edge_types:
            break
        ei = data[et].edge_index.cpu().numpy()
        parent = np.full(int(data[S.patch(k)].num_nodes), -1, dtype=np.int64)
        parent[ei[0]] = ei[1]
        idx = parent[idx]
        out.append(idx)
    return out


@torch.no_grad()
def _scale_features(model, data: HeteroData, k: int, batch: int = 256) -> np.ndarray:
    store = data[S.patch(k)]
    if S.FEAT in store:
        return store[S.FEAT].float().cpu().numpy()
    enc = model.image_encoder
    img = store[S.IMG]
    dev = next(model.parameters()).device
    parts = [
        enc.features(img[a : a + batch].to(dev)).float().cpu().numpy()
        for a in range(0, img.shape[0], batch)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, enc.backbone.num_features), np.float32)


def _neighbour_mean(data: HeteroData, x: np.ndarray) -> np.ndarray:
    if S.SPOT_NEAR_SPOT not in data.edge_types:
        return x.copy()
    src, dst = data[S.SPOT_NEAR_SPOT].edge_index.cpu().numpy()
    agg = np.zeros_like(x)
    np.add.at(agg, dst, x[src])
    deg = np.bincount(dst, minlength=x.shape[0]).astype(np.float32)
    has = deg > 0
    out = x.copy()
    out[has] = agg[has] / deg[has, None]
    return out


@torch.no_grad()
def probe_features(model, data: HeteroData, *, device="cpu", batch_spots: int = 8192):
    """Image-side features of every spot of ``data``: ``float32 [N, F]`` (see the module).

    ``data``: a slide graph built with the model's build config (its expression is not used).
    """
    from tissuegraph.train.infer import image_only_embedding

    m = getattr(model, "module", model)
    if m.image_encoder is None or S.patch(0) not in data.node_types:
        raise InputError("the image -> expression probe needs graphs with image patches")
    anc = _patch_ancestors(data, m.n_scales)
    parts = [_scale_features(m, data, k)[idx] for k, idx in enumerate(anc)]
    own = np.concatenate(parts, 1).astype(np.float32)
    emb = image_only_embedding(m, data, batch_spots=batch_spots, device=device)
    return np.concatenate([own, _neighbour_mean(data, own), emb], 1).astype(np.float32)


def _ridge_path(z: np.ndarray, y: np.ndarray, alphas: Sequence[float]):
    """Ridge solutions (with intercept) for every penalty from one SVD."""
    zm, ym = z.mean(0), y.mean(0)
    u, sv, vt = np.linalg.svd(z - zm, full_matrices=False)
    uty = u.T @ (y - ym)
    out = []
    for a in alphas:
        coef = vt.T @ ((sv / (sv**2 + a))[:, None] * uty)
        out.append((coef, ym - zm @ coef))
    return out


def fit_probe(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    n_pcs: int = 256,
    alphas: Sequence[float] = ALPHAS,
) -> dict:
    """Standardise -> PCA(``n_pcs``) -> ridge, penalty by CV grouped by ``groups`` (slides).

    Shapes: ``x`` ``[N, F]``, ``y`` ``[N, G]``, ``groups`` ``[N]``. Returns the probe as a dict
    of tensors and plain values (``mean``, ``sd``, ``pca_mean``, ``components`` ``[k, F]``,
    ``coef`` ``[k, G]``, ``intercept`` ``[G]``, ``alpha``, ``alphas``, ``cv_mse``,
    ``n_spots``, ``n_features``, ``version``).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    groups = np.asarray(groups)
    if x.shape[0] < 3:
        raise InputError(f"the probe needs at least 3 spots, got {x.shape[0]}")
    mean = x.mean(0)
    sd = x.std(0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    xs = (x - mean) / sd
    k = int(min(n_pcs, xs.shape[1], xs.shape[0] - 1))
    pca_mean = xs.mean(0)
    _, _, vt = np.linalg.svd(xs - pca_mean, full_matrices=False)
    comps = vt[:k]
    z = (xs - pca_mean) @ comps.T
    uniq = np.unique(groups)
    if len(uniq) < 2:  # one slide: five contiguous blocks of spots
        groups = np.minimum(np.arange(len(z)) * 5 // len(z), 4)
        uniq = np.unique(groups)
    err = np.zeros(len(alphas))
    for g in uniq:
        tr, te = groups != g, groups == g
        for i, (coef, b) in enumerate(_ridge_path(z[tr], y[tr], alphas)):
            err[i] += np.mean((z[te] @ coef + b - y[te]) ** 2)
    best = int(np.argmin(err))
    coef, intercept = _ridge_path(z, y, [alphas[best]])[0]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return {
        "version": PROBE_VERSION,
        "mean": t(mean),
        "sd": t(sd),
        "pca_mean": t(pca_mean),
        "components": t(comps),
        "coef": t(coef),
        "intercept": t(intercept),
        "alpha": float(alphas[best]),
        "alphas": [float(a) for a in alphas],
        "cv_mse": [float(e / len(uniq)) for e in err],
        "n_spots": int(x.shape[0]),
        "n_features": int(x.shape[1]),
    }


def apply_probe(probe: dict, x: np.ndarray) -> np.ndarray:
    """Predicted normalised expression ``float32 [N, G]`` of features ``x`` ``[N, F]``."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[1] != int(probe["n_features"]):
        raise InputError(
            f"probe expects {probe['n_features']} features per spot, got {x.shape[1]}: "
            "build the slide with the checkpoint's build config"
        )
    n = lambda k: probe[k].double().numpy()  # noqa: E731
    z = ((x - n("mean")) / n("sd") - n("pca_mean")) @ n("components").T
    return (z @ n("coef") + n("intercept")).astype(np.float32)


def fit_on_graphs(model, graphs: Sequence[HeteroData], *, max_spots: int = 50000, seed: int = 0):
    """:func:`fit_probe` on the spots of ``graphs`` (targets: their stored expression ``x``)."""
    xs, ys, gs = [], [], []
    for i, g in enumerate(graphs):
        xs.append(probe_features(model, g, device=next(model.parameters()).device))
        x = g[S.SPOT][S.X]
        ys.append((x.to_dense() if x.is_sparse else x).float().cpu().numpy())
        gs.append(np.full(xs[-1].shape[0], i))
    x, y, groups = np.concatenate(xs), np.concatenate(ys), np.concatenate(gs)
    if x.shape[0] > max_spots:
        keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_spots, replace=False))
        x, y, groups = x[keep], y[keep], groups[keep]
    return fit_probe(x, y, groups)


def attach_probe(trainer) -> None:
    """Fit the probe for ``last.pt`` (and ``best.pt`` when written) and store it there."""
    import copy

    from tissuegraph.nn import checkpoint as K
    from tissuegraph.train.checkpoint import load, save_checkpoint

    if trainer.indices is not None:
        graphs = [ix.data for ix in trainer.indices]
        names = list(trainer.slide_names)
    else:  # on-demand corpus: this rank's slides in a seeded order until probe_max_spots
        ds, cap = trainer.dataset, int(trainer.cfg.train.probe_max_spots)
        own = np.asarray(getattr(trainer.sampler, "slides", np.arange(len(ds))))
        order = np.random.default_rng(int(trainer.cfg.seed)).permutation(own)
        graphs, names, n = [], [], 0
        for s in order:
            if n >= cap:
                break
            graphs.append(ds.get(int(s)).data)
            names.append(trainer.slide_names[int(s)])
            n += int(graphs[-1][S.SPOT].num_nodes)
    model = trainer.model
    was = model.training
    paths = [trainer.ckpt_path, trainer.ckpt_path.parent / "best.pt"]
    for path in paths:
        if not path.is_file():
            continue
        ck = load(path, model=False)
        m = model
        if path != trainer.ckpt_path:
            m = copy.deepcopy(model)
            m.load_state_dict(ck.state_dict)
        m.eval()
        probe = fit_on_graphs(
            m, graphs, max_spots=int(trainer.cfg.train.probe_max_spots), seed=int(trainer.cfg.seed)
        )
        probe["slides"] = names
        obj = ck.raw
        obj[K.PROBE] = probe
        save_checkpoint(obj, path)
        log.info(
            "probe fitted on %d spots of %d slide(s) (alpha %.3g) -> %s",
            probe["n_spots"],
            len(names),
            probe["alpha"],
            path,
        )
    model.train(was)
