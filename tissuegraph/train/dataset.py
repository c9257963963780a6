"""Pretraining over a corpus: slide graphs opened on demand, in a bounded cache.

:class:`SlideDataset` reads the manifest of a ``build-graphs`` folder (the index: per-slide
``n_spots``, ``data_spec`` and ``panel_hash``, recorded at build time) and opens a slide's
graph only when a tile of it is drawn, memory-mapped (``torch.load(mmap=True,
weights_only=True)``), keeping at most ``max_cached`` slides in a least-recently-used cache.

:class:`LazyTileSampler` draws the same spatial tiles as
:class:`~tissuegraph.train.sampler.TileSampler`, in an order that touches each slide once
per epoch: each epoch shuffles this rank's slides into chunks of ``chunk_slides`` (the cache
size), and shuffles the tiles of one chunk at a time. When all of a rank's slides fit in one
chunk the order is exactly ``TileSampler``'s. Under DDP the slides are split among the ranks
by a seeded permutation, so each rank opens only its own slides; the ranks stay in lockstep
by step, each with its own sampler state (saved per rank in checkpoints).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import HeteroData

from tissuegraph._utils import release_heap
from tissuegraph.errors import InputError
from tissuegraph.graph import schema as S
from tissuegraph.train.sampler import SlideIndex, extract_tile, slide_epoch_tiles, slide_layout

__all__ = ["SlideDataset", "LazyTileSampler", "manifest_data_spec"]

log = logging.getLogger("tissuegraph.train")


class SlideDataset:
    """The slides of a ``build-graphs`` folder, opened on demand.

    Parameters
    ----------
    root
        The folder (graph files are ``root / entry["file"]``).
    manifest
        Its manifest (``slides``: one entry per slide, in slide-index order).
    max_cached
        Slides kept open at once (least recently used are dropped); 0: no limit.
    on_load
        Called as ``f(index, slide)`` when a slide is opened, before it is cached (e.g. to
        precompute the standardised expression ``spot.z``); more can be appended.

    Attributes: ``names``, ``loads`` (graph files opened so far).
    """

    def __init__(
        self,
        root,
        manifest: dict,
        *,
        max_cached: int = 64,
        on_load: list[Callable[[SlideIndex, int], None]] | None = None,
    ):
        self.root = Path(root)
        self.entries = list(manifest.get("slides") or [])
        self.names = [e["name"] for e in self.entries]
        self.n_genes = len(manifest.get("genes", []))
        self.panel_hash = manifest.get("panel_hash")
        self.max_cached = int(max_cached)
        self.on_load = list(on_load or [])
        self.loads = 0
        self._cache: OrderedDict[int, SlideIndex] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def path(self, s: int) -> Path:
        return self.root / self.entries[s]["file"]

    def load(self, s: int) -> HeteroData:
        """Open slide ``s`` (memory-mapped) and check it against its manifest entry."""
        from tissuegraph.graph.storage import load_graph

        e, p = self.entries[s], self.path(s)
        g = load_graph(p, mmap=True)
        if S.SPOT not in g.node_types or S.X not in g[S.SPOT] or S.POS not in g[S.SPOT]:
            raise InputError(f"{p}: no spot nodes with x and pos (see the graph schema)")
        if int(g[S.SPOT][S.X].shape[1]) != self.n_genes:
            raise InputError(
                f"{p}: {g[S.SPOT][S.X].shape[1]} expression columns but the manifest lists "
                f"{self.n_genes} genes: rebuild the graphs"
            )
        n = int(g[S.SPOT][S.X].shape[0])
        if e.get("n_spots") is not None and n != int(e["n_spots"]):
            raise InputError(
                f"{p}: {n} spots but the manifest records {e['n_spots']}: the file changed "
                "after the build; rebuild the graphs"
            )
        return g

    def get(self, s: int) -> SlideIndex:
        """Slide ``s``'s :class:`SlideIndex` (opened and cached on first use)."""
        s = int(s)
        ix = self._cache.get(s)
        if ix is not None:
            self._cache.move_to_end(s)
            return ix
        ix = SlideIndex(self.load(s), self.names[s])
        self.loads += 1
        for f in self.on_load:
            f(ix, s)
        self._cache[s] = ix
        evicted = False
        while self.max_cached > 0 and len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
            evicted = True
        if evicted:
            release_heap()  # the dropped slides' heap pages
        return ix

    def cached(self) -> list[int]:
        """The slides open now, least recently used first."""
        return list(self._cache)


def manifest_data_spec(root, manifest: dict) -> S.DataSpec:
    """The merged data spec of a folder's slides, from the manifest's per-slide records.

    Manifests written before these were recorded fall back to opening each graph once (one
    at a time, so memory stays bounded)."""
    from tissuegraph.graph.storage import load_graph

    root = Path(root)
    slides = manifest.get("slides") or []
    panel = manifest.get("panel_hash")
    specs, names, opened = [], [], 0
    for e in slides:
        spec = e.get("data_spec")
        if spec is None:
            spec = S.DataSpec.from_graph(load_graph(root / e["file"], mmap=True))
            opened += 1
        if panel and e.get("panel_hash") not in (None, panel):
            raise InputError(
                f"{root / e['file']}: built with another gene panel (panel_hash "
                f"{e['panel_hash']}) than {root / S.MANIFEST} ({panel}): rebuild it"
            )
        specs.append(spec)
        names.append(e["name"])
    if opened:
        log.warning(
            "%s: %d slide(s) have no data_spec in the manifest (built by an older version): "
            "opened them once to check them; rebuild to skip this",
            root / S.MANIFEST,
            opened,
        )
    return S.DataSpec.merge(specs, names)


class LazyTileSampler:
    """Spatial tiles over a :class:`SlideDataset`, each slide opened once per epoch.

    Same tiles, held-out windows and parameters as
    :class:`~tissuegraph.train.sampler.TileSampler` (see the module docstring for the order).

    Parameters
    ----------
    dataset
        The slides.
    batch_spots, n_hops, seed, val_fraction
        As for ``TileSampler``.
    rank, world_size
        This rank's slides are ``perm[rank::world_size]`` of a permutation seeded by
        ``seed`` (all slides when ``world_size`` is 1).
    chunk_slides
        Slides whose tiles are shuffled together (at most the cache size; 0: all).
    max_val_tiles
        Held-out tiles listed in :attr:`val_tiles` (from the first slides on).
    """

    def __init__(
        self,
        dataset: SlideDataset,
        batch_spots: int,
        n_hops: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        val_fraction: float = 0.1,
        chunk_slides: int = 64,
        max_val_tiles: int = 32,
    ):
        self.dataset = dataset
        self.batch_spots, self.n_hops = int(batch_spots), int(n_hops)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.val_fraction = float(val_fraction)
        self.max_val_tiles = int(max_val_tiles)
        n = len(dataset)
        if n == 0:
            raise InputError("the manifest lists no slides")
        if self.world_size > n:
            raise InputError(
                f"{self.world_size} ranks but only {n} slides: each rank needs a slide of its "
                "own (use fewer processes or set train.max_cached_slides=0)"
            )
        perm = np.arange(n)
        if self.world_size > 1:
            perm = np.random.default_rng([self.seed, 15485863]).permutation(n)
        self.slides = np.sort(perm[self.rank :: self.world_size])
        self.chunk_slides = int(chunk_slides) if int(chunk_slides) > 0 else len(self.slides)
        self.epoch, self.chunk, self.position = 0, 0, 0
        self._tiles: tuple[tuple[int, int], list] | None = None
        self._val: list | None = None
        dataset.on_load.append(self._layout)

    # ------------------------------------------------------------------ per slide
    def _layout(self, ix: SlideIndex, s: int) -> None:
        ix.tiling = slide_layout(ix, self.batch_spots, self.seed, s, self.val_fraction)

    def _slide(self, s: int):
        ix = self.dataset.get(s)
        if not hasattr(ix, "tiling"):  # opened before this sampler existed
            self._layout(ix, s)
        return ix, ix.tiling

    # ------------------------------------------------------------------ order
    def chunks(self, epoch: int) -> list[np.ndarray]:
        """This rank's slides of ``epoch``, in the chunks their tiles are drawn from."""
        if len(self.slides) <= self.chunk_slides:
            return [self.slides]
        order = np.random.default_rng([self.seed, epoch, 104729, 1]).permutation(self.slides)
        c = self.chunk_slides
        return [order[a : a + c] for a in range(0, len(order), c)]

    def chunk_tiles(self, epoch: int, chunk: int) -> list[tuple[int, np.ndarray]]:
        """The tiles ``(slide, core spot ids)`` of one chunk of ``epoch``, in order."""
        if self._tiles is not None and self._tiles[0] == (epoch, chunk):
            return self._tiles[1]
        chunks = self.chunks(epoch)
        tiles = []
        for s in chunks[chunk]:
            ix, (side, vm, _) = self._slide(int(s))
            cores = slide_epoch_tiles(ix, side, vm, self.batch_spots, self.seed, epoch, int(s))
            tiles += [(int(s), w) for w in cores]
        key = [self.seed, epoch, 104729] if len(chunks) == 1 else [self.seed, epoch, 104729, 2]
        key = key + ([] if len(chunks) == 1 else [chunk])
        order = np.random.default_rng(key).permutation(len(tiles))
        tiles = [tiles[i] for i in order]
        self._tiles = ((epoch, chunk), tiles)
        return tiles

    def epoch_tiles(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """All of this rank's tiles of ``epoch`` in order (opens every slide of the rank)."""
        return [t for c in range(len(self.chunks(epoch))) for t in self.chunk_tiles(epoch, c)]

    def next_tile(self) -> tuple[int, np.ndarray]:
        empty = 0
        while True:
            n_chunks = len(self.chunks(self.epoch))
            if self.chunk >= n_chunks:
                self.epoch, self.chunk, self.position = self.epoch + 1, 0, 0
                continue
            tiles = self.chunk_tiles(self.epoch, self.chunk)
            if self.position < len(tiles):
                t = tiles[self.position]
                self.position += 1
                return t
            empty = 0 if tiles else empty + 1
            if empty > n_chunks:
                raise InputError(
                    "no training tiles: the slides are too small for train.batch_spots"
                )
            self.chunk, self.position = self.chunk + 1, 0

    # ------------------------------------------------------------------ tiles
    def build(self, slide: int, core: np.ndarray, *, train: bool = True) -> HeteroData:
        """The tile subgraph; training tiles never reach into held-out spots."""
        ix, (_, vm, _) = self._slide(int(slide))
        allowed = ~vm if train else None
        tile = extract_tile(ix, torch.from_numpy(np.asarray(core)), self.n_hops, allowed)
        tile.slide_index = int(slide)
        return tile

    @property
    def val_tiles(self) -> list[tuple[int, np.ndarray]]:
        """Held-out tiles of the first slides, up to ``max_val_tiles`` (opened on first use)."""
        if self._val is None:
            val: list = []
            if self.val_fraction > 0:
                for s in range(len(self.dataset)):
                    if len(val) >= self.max_val_tiles:
                        break
                    _, (_, _, wins) = self._slide(s)
                    val += [(s, w) for w in wins]
            self._val = val
        return self._val

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "chunk": self.chunk,
            "position": self.position,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.chunk = int(state.get("chunk", 0))
