"""Held-out evaluation: losses, localisation accuracy and image <-> expression retrieval."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from tissuegraph.graph import schema as S
from tissuegraph.nn.model import unwrap
from tissuegraph.train.objectives import Objectives, apply_masks

__all__ = ["evaluate", "localisation_accuracy", "rank_fraction", "retrieval_top1"]


@torch.no_grad()
def localisation_accuracy(
    model, tile, per_level: dict | None = None
) -> tuple[int, int, np.ndarray]:
    """Correct and total 3x3 localisation predictions in one tile (+ the targets).

    ``per_level`` (optional dict) accumulates ``{k: [correct, total]}`` per child scale ``k``.
    """
    out = model(tile)
    correct, total, targets = 0, 0, []
    for k in range(model.n_scales - 1):
        et = S.patch_in_parent(k)
        if et not in tile.edge_types or tile[et].edge_index.shape[1] == 0:
            continue
        ei, loc = tile[et].edge_index, tile[et][S.LOC]
        pred = model.localisation_logits(tile, out, k, ei).argmax(-1)
        correct += int((pred == loc).sum())
        total += int(loc.numel())
        if per_level is not None:
            acc = per_level.setdefault(k, [0, 0])
            acc[0] += int((pred == loc).sum())
            acc[1] += int(loc.numel())
        targets.append(loc.cpu().numpy())
    return correct, total, np.concatenate(targets) if targets else np.zeros(0, np.int64)


@torch.no_grad()
def retrieval_top1(model, tile) -> tuple[int, int, float, float]:
    """Image -> expression retrieval among the tile's core spots.

    Every core spot is an anchor (its own ``patch_0 <-> spot`` edges removed, as in training);
    returns (top-1 hits, queries, chance = 1 / n_candidates, auc_sum) where ``auc_sum`` adds,
    over queries, the fraction of wrong candidates scored below the true partner (chance 0.5
    per query; ties count half). Top-1 on a few hundred queries sits near a handful of hits and
    is noisy; the rank fraction uses every candidate and is the steadier signal.
    """
    g = torch.Generator().manual_seed(0)
    tile = apply_masks(
        tile,
        mask_ratio=0.0,
        anchor_fraction=1.0,
        generator=g,
        cut_identity=model.fusion == "middle",
    )
    out = model(tile)
    if out["image"] is None:
        return 0, 0, 0.0, 0.0
    a = tile[S.SPOT]["anchor"]
    n = int(a.sum())
    if n < 2:
        return 0, 0, 0.0, 0.0
    ze = F.normalize(model.proj_expr(out["expr"][a]).float(), dim=-1)
    zi = F.normalize(model.proj_image(out["image"][a]).float(), dim=-1)
    sim = zi @ ze.T
    hits = int((sim.argmax(-1) == torch.arange(n, device=ze.device)).sum())
    return hits, n, 1.0 / n, float(rank_fraction(sim).sum())


def rank_fraction(sim: torch.Tensor) -> torch.Tensor:
    """Per row of a square score matrix, the fraction of off-diagonal entries below the diagonal
    one (ties count half): 1 = the true partner ranks first, 0.5 = chance."""
    n = sim.shape[0]
    idx = torch.arange(n, device=sim.device)
    true = sim[idx, idx].unsqueeze(1)
    below = (sim < true).sum(1).double() + 0.5 * ((sim == true).sum(1).double() - 1)
    return below / (n - 1)


@torch.no_grad()
def evaluate(model, sampler, obj_cfg, device, *, max_tiles: int = 32, autocast=None) -> dict:
    """Metrics on the sampler's held-out tiles.

    Returns ``val_loss`` and ``val_<term>`` (deterministic masks), ``val_localisation_acc`` and
    ``val_localisation_majority`` (accuracy of always predicting the most frequent cell),
    ``val_localisation_acc_k`` (children at scale ``k`` only), ``val_retrieval_top1``,
    ``val_retrieval_chance`` and ``val_retrieval_auc`` (chance 0.5).
    """
    m = unwrap(model)
    was = m.training
    m.eval()
    ctx = autocast or contextlib.nullcontext
    obj = Objectives(m, obj_cfg)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    lc = lt = rh = rq = 0
    ra = 0.0
    chance = []
    targets = []
    levels: dict = {}
    for i, (s, core) in enumerate(sampler.val_tiles[:max_tiles]):
        with ctx():
            tile = sampler.build(s, core, train=False)
            g = torch.Generator().manual_seed(10007 + i)
            t1 = apply_masks(
                tile.clone(),
                mask_ratio=obj_cfg.mask_ratio,
                anchor_fraction=obj_cfg.contrastive_fraction,
                generator=g,
                cut_identity=m.fusion == "middle",
            ).to(device)
            for k, v in obj(t1).items():
                if k == "temperature":
                    continue
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
            c, t, tg = localisation_accuracy(m, tile.clone().to(device), levels)
            lc, lt = lc + c, lt + t
            targets.append(tg)
            h, q, ch, au = retrieval_top1(m, tile.to(device))
            rh, rq, ra = rh + h, rq + q, ra + au
            if q:
                chance.append((ch, q))
    m.train(was)
    res = {f"val_{k}": sums[k] / counts[k] for k in sums}
    if lt:
        tg = np.concatenate(targets)
        res["val_localisation_acc"] = lc / lt
        res["val_localisation_majority"] = float(np.bincount(tg, minlength=9).max() / len(tg))
        for k, (c, n) in sorted(levels.items()):
            if n:
                res[f"val_localisation_acc_{k}"] = c / n
    if rq:
        res["val_retrieval_top1"] = rh / rq
        res["val_retrieval_chance"] = sum(c * q for c, q in chance) / rq
        res["val_retrieval_auc"] = ra / rq
    return res
