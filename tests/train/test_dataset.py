"""The on-demand slide dataset: same tiles as in memory, bounded cache, exact resume, DDP."""

from __future__ import annotations

import json
import textwrap
from collections import Counter

import numpy as np
import pytest
import torch

from tissuegraph.errors import ConfigError, InputError
from tissuegraph.graph import schema as S
from tissuegraph.graph.storage import read_manifest
from tissuegraph.nn.testing import tiny_graph, write_graph_dir
from tissuegraph.train.dataset import LazyTileSampler, SlideDataset
from tissuegraph.train.loop import Trainer, pretrain
from tissuegraph.train.sampler import SlideIndex, TileSampler

MODEL = {
    "hidden_dim": 16,
    "expr_hidden_dim": 16,
    "proj_dim": 8,
    "dropout": 0.1,
    "image_encoder": {"name": "test_resnet"},
}


def _corpus(folder, n: int, *, standardize: bool = False):
    graphs = [
        tiny_graph(9 + (i % 4), n_genes=12, crop_px=8, seed=i, slide_index=i) for i in range(n)
    ]
    write_graph_dir(graphs, folder, standardize=standardize, n_pcs=4 if standardize else 0)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("corpus"), 5, standardize=True)


@pytest.fixture(scope="module")
def corpus10(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("corpus10"), 10)


def _in_memory(folder, **kw):
    from tissuegraph.train.loop import load_graph_dir

    _, graphs, names = load_graph_dir(folder)
    return TileSampler([SlideIndex(g, n) for g, n in zip(graphs, names)], 40, 2, **kw)


def _key(tiles):
    return [(s, tuple(c.tolist())) for s, c in tiles]


def test_lazy_sampler_draws_the_in_memory_tiles(corpus):
    ref = _in_memory(corpus, seed=4, val_fraction=0.2)
    ds = SlideDataset(corpus, read_manifest(corpus), max_cached=8)
    lazy = LazyTileSampler(ds, 40, 2, seed=4, val_fraction=0.2, chunk_slides=8, max_val_tiles=99)
    assert ds.loads == 0  # nothing is opened before a tile is drawn
    for epoch in (0, 1):  # all slides fit in the cache: exactly TileSampler's order
        assert _key(lazy.epoch_tiles(epoch)) == _key(ref.epoch_tiles(epoch))
    assert _key(lazy.val_tiles) == _key(ref.val_tiles)
    s, core = ref.epoch_tiles(0)[0]
    a, b = ref.build(s, core), lazy.build(s, core)
    assert torch.equal(a[S.SPOT]["n_id"], b[S.SPOT]["n_id"])
    assert torch.equal(a[S.SPOT][S.X], b[S.SPOT][S.X])

    # a cache of 2 slides: the same tiles per epoch, each slide opened once per epoch
    small = SlideDataset(corpus, read_manifest(corpus), max_cached=2)
    lz = LazyTileSampler(small, 40, 2, seed=4, val_fraction=0.2, chunk_slides=2)
    n0, n1 = len(ref.epoch_tiles(0)), len(ref.epoch_tiles(1))
    drawn = [lz.next_tile() for _ in range(n0 + n1)]
    assert Counter(_key(drawn[:n0])) == Counter(_key(ref.epoch_tiles(0)))
    assert Counter(_key(drawn[n0:])) == Counter(_key(ref.epoch_tiles(1)))
    assert _key(drawn[:n0]) != _key(ref.epoch_tiles(0))  # shuffled within chunks of 2 slides
    assert small.loads == 2 * 5 and len(small.cached()) <= 2
    # the tiles of one chunk come from at most 2 slides
    for c in range(3):
        assert len({s for s, _ in lz.chunk_tiles(1, c)}) <= 2


def test_trainer_reads_the_manifest_and_computes_z_on_load(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "r", max_cached_slides=2, max_steps=4)
    tr = Trainer(cfg, progress=False)
    assert tr.lazy and tr.dataset.loads == 0  # start-up opened no graph
    tile = tr._tile(0)
    assert S.Z in tile[S.SPOT] and tile[S.SPOT][S.Z].shape[1] == 4
    s = tile.slide_index
    ref = Trainer(_cfg(corpus, tmp_path / "r2", max_steps=4), progress=False)
    assert not ref.lazy  # 5 slides <= 64: loaded whole, as before
    z_ref = ref.indices[s].data[S.SPOT][S.Z][tile[S.SPOT]["n_id"]]
    assert torch.allclose(tile[S.SPOT][S.Z], z_ref)


def _cfg(graphs, run_dir, **train):
    t = {
        "max_steps": 6,
        "batch_spots": 40,
        "log_every": 1,
        "eval_every": 3,
        "ckpt_every": 0,
        "ckpt_every_min": 0,
        "warmup_steps": 1,
        "val_fraction": 0.2,
        "tensorboard": False,
        "threads": 1,
    }
    t.update(train)
    return {"graphs": str(graphs), "run_dir": str(run_dir), "seed": 3, "model": MODEL, "train": t}


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_exact_with_the_lazy_dataset(corpus, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    pretrain(_cfg(corpus, ref, max_cached_slides=2), progress=False)
    run = tmp_path / "run"
    # stop after step 4 (a checkpoint), then resume to 6
    from tissuegraph.train import loop as loop_mod

    orig = loop_mod.Trainer._tile

    def tile(self, step):
        if step == 4 and not self.resume:
            raise KeyboardInterrupt
        return orig(self, step)

    monkeypatch.setattr(loop_mod.Trainer, "_tile", tile)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg(corpus, run, max_cached_slides=2, ckpt_every=2), progress=False)
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["step"] == 4 and ck["samplers"][0]["position"] + ck["samplers"][0]["chunk"] > 0
    pretrain(_cfg(corpus, run, max_cached_slides=2, ckpt_every=2), resume=True, progress=False)
    a, b = _rows(ref), {r["step"]: r for r in _rows(run)}
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for r in a:
        for k, v in r.items():
            if k != "spots_per_s":
                assert b[r["step"]][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (r["step"], k)
    wa = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wa)
    # another cache size changes the tile order: refused on resume
    with pytest.raises(ConfigError, match="max_cached_slides"):
        pretrain(_cfg(corpus, run, max_cached_slides=3), resume=True, progress=False)


def test_bad_cache_size_and_too_many_ranks(corpus, tmp_path):
    with pytest.raises(ConfigError, match="max_cached_slides"):
        Trainer(_cfg(corpus, tmp_path / "r", max_cached_slides=-1), progress=False)
    ds = SlideDataset(corpus, read_manifest(corpus), max_cached=2)
    with pytest.raises(InputError, match="6 ranks but only 5 slides"):
        LazyTileSampler(ds, 40, 2, rank=0, world_size=6)
    # a graph that changed after the build is refused with its path
    m = read_manifest(corpus)
    m["slides"][1]["n_spots"] = 3
    with pytest.raises(InputError, match="slide|spots") as info:
        SlideDataset(corpus, m, max_cached=2).get(1)
    assert str(corpus / m["slides"][1]["file"]) in str(info.value)


def test_ddp_gloo_lazy_ranks_read_their_own_slides(corpus10, tmp_path, torchrun_two):
    cfg = _cfg(corpus10, tmp_path / "run", max_steps=4, eval_every=0, max_cached_slides=3)
    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, os, torch
        torch.set_num_threads(1)
        from tissuegraph.train.loop import Trainer
        tr = Trainer({cfg!r}, progress=False)
        tr.fit()
        rank = int(os.environ["RANK"])
        torch.save({{n: p.detach().clone() for n, p in tr.model.named_parameters()}},
                   "{tmp_path}/rank%d.pt" % rank)
        opened = sorted(set(tr.dataset.cached()))
        json.dump({{"mine": [int(s) for s in tr.sampler.slides], "loads": tr.dataset.loads,
                   "opened": opened}}, open("{tmp_path}/rank%d.json" % rank, "w"))
    """)
    )
    w0, w1 = torchrun_two(script, tmp_path)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["mine"]) == len(r1["mine"]) == 5 and not set(r0["mine"]) & set(r1["mine"])
    for r in (r0, r1):
        assert set(r["opened"]) <= set(r["mine"]) and 0 < len(r["opened"]) <= 3
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["samplers"]) == 2
    assert np.all([s["seed"] == 3 for s in ck["samplers"]])
