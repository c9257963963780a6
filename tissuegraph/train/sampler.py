"""Spatial-tile mini-batches: a square window of a slide's spots plus a halo of ``n_hops``
hops on the spot graph, with their ``patch_0``, ancestor patches, all gene / pathway nodes and
the edges among them. Plain torch index ops (CSR gathers), no pyg-lib / torch-sparse."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from tissuegraph.errors import InputError
from tissuegraph.graph import schema as S

__all__ = [
    "SlideIndex",
    "TileSampler",
    "extract_tile",
    "grid_tiles",
    "slide_layout",
    "slide_epoch_tiles",
]


def _csr(key: Tensor, n: int) -> tuple[Tensor, Tensor]:
    perm = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n)
    rowptr = torch.zeros(n + 1, dtype=torch.long)
    rowptr[1:] = torch.cumsum(counts, 0)
    return rowptr, perm


def _gather(rowptr: Tensor, nodes: Tensor) -> Tensor:
    """Positions (into the sorted order) of all entries of the rows ``nodes``."""
    start = rowptr[nodes]
    cnt = rowptr[nodes + 1] - start
    total = int(cnt.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    offs = torch.repeat_interleave(start - (torch.cumsum(cnt, 0) - cnt), cnt)
    return offs + torch.arange(total)


class SlideIndex:
    """Per-slide lookup structures (built once): CSR of every edge type by its subsetted end.

    Node types ``spot`` and ``patch_k`` are subsetted per tile; ``gene`` / ``pathway`` are
    always kept whole.
    """

    whole = (S.GENE, S.PATHWAY)

    def __init__(self, data: HeteroData, name: str = ""):
        self.data = data
        self.name = name
        spot = data[S.SPOT]
        self.n = int(spot[S.X].shape[0])
        self.pos = spot[S.POS].double().numpy()
        self.num = {t: self._num(t) for t in data.node_types}
        self.patch_types = S.patch_types(data)
        if self.patch_types:
            n0 = self.num[S.patch(0)]
            if n0 != self.n:
                raise InputError(
                    f"slide {name!r}: patch_0 has {n0} nodes but there are {self.n} spots "
                    "(row i of patch_0 must belong to spot i)"
                )
        self.csr: dict = {}
        for et in data.edge_types:
            ei = data[et].edge_index
            src_sub, dst_sub = et[0] not in self.whole, et[2] not in self.whole
            if src_sub:
                rowptr, perm = _csr(ei[0], self.num[et[0]])
                self.csr[et] = (0, rowptr, perm)
            elif dst_sub:
                rowptr, perm = _csr(ei[1], self.num[et[2]])
                self.csr[et] = (1, rowptr, perm)
            else:
                self.csr[et] = None
        near = data[S.SPOT_NEAR_SPOT] if S.SPOT_NEAR_SPOT in data.edge_types else None
        if near is not None and S.EDGE_ATTR in near and near.edge_index.shape[1]:
            self.near_scale = float(near[S.EDGE_ATTR].view(-1).float().median())
        else:
            self.near_scale = 1.0

    def _num(self, t: str) -> int:
        st = self.data[t]
        for a in (S.X, S.IMG, S.FEAT, S.INDEX, S.POS):
            if a in st:
                return int(st[a].shape[0])
        return int(st.num_nodes or 0)

    def neighbours(self, nodes: Tensor) -> Tensor:
        if S.SPOT_NEAR_SPOT not in self.csr:
            return torch.zeros(0, dtype=torch.long)
        _, rowptr, perm = self.csr[S.SPOT_NEAR_SPOT]
        return self.data[S.SPOT_NEAR_SPOT].edge_index[1, perm[_gather(rowptr, nodes)]]

    def halo(self, core: Tensor, n_hops: int, allowed: Tensor | None = None) -> Tensor:
        """Sorted spot ids within ``n_hops`` hops of ``core`` (through ``allowed`` spots)."""
        sel = torch.zeros(self.n, dtype=torch.bool)
        sel[core] = True
        frontier = core
        for _ in range(n_hops):
            nb = self.neighbours(frontier)
            if allowed is not None:
                nb = nb[allowed[nb]]
            nb = nb[~sel[nb]]
            nb = torch.unique(nb)
            if nb.numel() == 0:
                break
            sel[nb] = True
            frontier = nb
        return sel.nonzero().view(-1)


def extract_tile(
    index: SlideIndex, core: Tensor, n_hops: int, allowed: Tensor | None = None
) -> HeteroData:
    """The tile subgraph around ``core`` spot ids (a ``HeteroData`` with local indices).

    Extra attributes: ``spot.n_id`` (slide row of each spot), ``spot.core`` (bool: inside the
    window), ``patch_k.n_id``, graph-level ``near_scale`` and ``slide_index``.
    """
    data = index.data
    core = torch.as_tensor(core, dtype=torch.long)
    spots = index.halo(core, n_hops, allowed)
    keep: dict[str, Tensor] = {S.SPOT: spots}
    for k, t in enumerate(index.patch_types):
        if k == 0:
            keep[t] = spots
        else:
            et = S.patch_in_parent(k - 1)
            if et not in index.csr:
                break
            _, rowptr, perm = index.csr[et]
            par = data[et].edge_index[1, perm[_gather(rowptr, keep[S.patch(k - 1)])]]
            keep[t] = torch.unique(par)
    local: dict[str, Tensor] = {}
    for t, ids in keep.items():
        m = torch.full((index.num[t],), -1, dtype=torch.long)
        m[ids] = torch.arange(ids.numel())
        local[t] = m

    out = HeteroData()
    st = data[S.SPOT]
    x = st[S.X].index_select(0, spots)
    if x.is_sparse:
        x = x.to_dense()
    out[S.SPOT][S.X] = x
    if S.Z in st:
        out[S.SPOT][S.Z] = st[S.Z].index_select(0, spots)
    out[S.SPOT]["n_id"] = spots
    core_mask = torch.zeros(index.n, dtype=torch.bool)
    core_mask[core] = True
    out[S.SPOT]["core"] = core_mask[spots]
    for t in keep:
        if t == S.SPOT:
            continue
        for a in (S.IMG, S.FEAT):
            if a in data[t]:
                out[t][a] = data[t][a].index_select(0, keep[t])
        out[t]["n_id"] = keep[t]
    for t in SlideIndex.whole:
        if t in data.node_types:
            out[t][S.INDEX] = data[t][S.INDEX]
    for et in data.edge_types:
        if (et[0] not in keep and et[0] not in SlideIndex.whole) or (
            et[2] not in keep and et[2] not in SlideIndex.whole
        ):
            continue
        store = data[et]
        spec = index.csr[et]
        if spec is None:
            pos = None
            ei = store.edge_index
        else:
            side, rowptr, perm = spec
            anchor = et[0] if side == 0 else et[2]
            pos = perm[_gather(rowptr, keep[anchor])]
            ei = store.edge_index[:, pos]
            other = 1 - side
            if et[2 * other] not in SlideIndex.whole:
                ok = local[et[2 * other]][ei[other]] >= 0
                pos, ei = pos[ok], ei[:, ok]
            ei = ei.clone()
            for s in (0, 1):
                tname = et[2 * s]
                if tname not in SlideIndex.whole:
                    ei[s] = local[tname][ei[s]]
        out[et].edge_index = ei
        for a in (S.EDGE_ATTR, S.EDGE_WEIGHT, S.LOC):
            if a in store:
                out[et][a] = store[a] if pos is None else store[a][pos]
    out.near_scale = index.near_scale
    return out


def grid_tiles(
    pos: np.ndarray, side: float, offset=(0.0, 0.0), subset: np.ndarray | None = None
) -> list[np.ndarray]:
    """Spot ids per non-empty square window of ``side`` µm (grid shifted by ``offset``)."""
    ids = np.arange(len(pos)) if subset is None else np.flatnonzero(subset)
    if ids.size == 0:
        return []
    p = pos[ids]
    origin = p.min(0) - np.asarray(offset)
    cell = np.floor((p - origin) / side).astype(np.int64)
    key = cell[:, 0] * (1 << 32) + cell[:, 1]
    order = np.argsort(key, kind="stable")
    k = key[order]
    cuts = np.flatnonzero(np.diff(k)) + 1
    return [ids[order[a:b]] for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(k)])]


def _tile_side(pos: np.ndarray, batch_spots: int) -> float:
    """Window side (µm) whose non-empty windows hold ``batch_spots`` spots on average."""
    ext = np.ptp(pos, axis=0)
    area = max(float(ext[0] * ext[1]), 1e-6)
    side = math.sqrt(area / len(pos) * batch_spots)
    for _ in range(6):
        tiles = grid_tiles(pos, side)
        mean = len(pos) / max(len(tiles), 1)
        if mean <= 0:
            break
        side *= math.sqrt(batch_spots / mean)
        side = max(side, 1e-3)
    return side


def slide_layout(
    ix: SlideIndex, batch_spots: int, seed: int, s: int, val_fraction: float
) -> tuple[float, Tensor, list[np.ndarray]]:
    """A slide's window side (µm), held-out mask and held-out windows (fixed per seed)."""
    side = _tile_side(ix.pos, batch_spots)
    wins = grid_tiles(ix.pos, side)
    rng = np.random.default_rng([seed, 7919, s])
    n_val = int(round(val_fraction * len(wins)))
    if val_fraction > 0 and len(wins) > 1:
        n_val = max(1, min(n_val, len(wins) - 1))
    else:
        n_val = 0
    pick = rng.permutation(len(wins))[:n_val]
    vm = torch.zeros(ix.n, dtype=torch.bool)
    val = []
    for i in sorted(pick):
        vm[torch.from_numpy(wins[i])] = True
        val.append(wins[i])
    return side, vm, val


def slide_epoch_tiles(
    ix: SlideIndex, side: float, val_mask: Tensor, batch_spots: int, seed: int, epoch: int, s: int
) -> list[np.ndarray]:
    """Core spot ids of slide ``s``'s training windows in ``epoch`` (a randomly shifted grid)."""
    rng = np.random.default_rng([seed, epoch, s])
    off = rng.uniform(0, side, size=2)
    train = ~val_mask.numpy()
    if int(train.sum()) <= batch_spots:
        # the slide fits in one tile: train on all of it (no window cuts it apart)
        return [np.flatnonzero(train)]
    min_spots = max(2, batch_spots // 8)
    return [w for w in grid_tiles(ix.pos, side, off, train) if len(w) >= min_spots]


class TileSampler:
    """Draws spatial tiles across slides; deterministic given ``seed``, epoch and rank.

    A fixed grid of windows per slide is split into held-out (``val_fraction``) and training
    windows. Each epoch lays a randomly shifted grid over the training spots (a slide whose
    training spots fit in ``batch_spots`` is one tile), shuffles the windows of all slides,
    and gives rank ``r`` every ``world_size``-th one (all ranks get the same number of tiles).
    The state (``epoch``, ``position``) is saved in checkpoints.

    Parameters
    ----------
    indices
        One :class:`SlideIndex` per slide.
    batch_spots
        Target spots per tile (the window, before the halo).
    n_hops
        Halo depth (the GNN's number of layers).
    """

    def __init__(
        self,
        indices: list[SlideIndex],
        batch_spots: int,
        n_hops: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        val_fraction: float = 0.1,
    ):
        self.indices = indices
        self.batch_spots = int(batch_spots)
        self.n_hops = int(n_hops)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch, self.position = 0, 0
        self.side: list[float] = []
        self.val_mask: list[Tensor] = []
        self.val_tiles: list[tuple[int, np.ndarray]] = []
        for s, ix in enumerate(indices):
            side, vm, wins = slide_layout(ix, self.batch_spots, self.seed, s, val_fraction)
            self.side.append(side)
            self.val_mask.append(vm)
            self.val_tiles += [(s, w) for w in wins]
        self._cache: tuple[int, list] | None = None
        self._whole: dict[tuple[int, bool], HeteroData] = {}  # built one-tile slides
        if not self.epoch_tiles(0):
            raise InputError("no training tiles: the slides are too small for train.batch_spots")

    def epoch_tiles(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """This rank's tiles ``(slide, core spot ids)`` of ``epoch``, in order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        tiles = []
        for s, ix in enumerate(self.indices):
            cores = slide_epoch_tiles(
                ix, self.side[s], self.val_mask[s], self.batch_spots, self.seed, epoch, s
            )
            tiles += [(s, w) for w in cores]
        order = np.random.default_rng([self.seed, epoch, 104729]).permutation(len(tiles))
        tiles = [tiles[i] for i in order]
        per = len(tiles) // self.world_size
        mine = tiles[self.rank :: self.world_size][:per]
        self._cache = (epoch, mine)
        return mine

    def next_tile(self) -> tuple[int, np.ndarray]:
        tiles = self.epoch_tiles(self.epoch)
        if self.position >= len(tiles):
            self.epoch, self.position = self.epoch + 1, 0
            tiles = self.epoch_tiles(self.epoch)
        t = tiles[self.position]
        self.position += 1
        return t

    def build(self, slide: int, core: np.ndarray, *, train: bool = True) -> HeteroData:
        """The tile subgraph; training tiles never reach into held-out spots."""
        core = np.asarray(core)
        allowed = ~self.val_mask[slide] if train else None
        n_allowed = self.indices[slide].n if allowed is None else int(allowed.sum())
        whole = core.size == n_allowed  # a one-tile slide: the same subgraph every time
        if whole and (slide, train) in self._whole:
            # a shallow copy: masking replaces the copy's tensors, never the cached ones
            return copy.copy(self._whole[(slide, train)])
        tile = extract_tile(self.indices[slide], torch.from_numpy(core), self.n_hops, allowed)
        tile.slide_index = slide
        if whole:
            self._whole[(slide, train)] = tile
            return copy.copy(tile)
        return tile

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
