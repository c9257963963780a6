"""Sampler, objectives, loop, checkpoints, resume, DDP and bad input on tiny synthetic graphs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tissuegraph.errors import ConfigError, InputError, TissueGraphError
from tissuegraph.graph import schema as S
from tissuegraph.nn.testing import tiny_graph, write_graph_dir
from tissuegraph.train import loop as loop_mod
from tissuegraph.train.checkpoint import load_model
from tissuegraph.train.infer import embed_graph, predict_graph
from tissuegraph.train.loop import Trainer, TrainingInterrupted, pretrain
from tissuegraph.train.objectives import apply_masks
from tissuegraph.train.sampler import SlideIndex, TileSampler

MODEL = {
    "hidden_dim": 16,
    "expr_hidden_dim": 16,
    "proj_dim": 8,
    "dropout": 0.1,
    "image_encoder": {"name": "test_resnet"},
}


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_graphs")
    write_graph_dir(
        [
            tiny_graph(14, n_genes=16, crop_px=16, seed=0, slide_index=0),
            tiny_graph(12, n_genes=16, crop_px=16, seed=1, slide_index=1),
        ],
        d,
    )
    return d


def _cfg(graph_dir, run_dir, **train):
    t = {
        "max_steps": 6,
        "batch_spots": 48,
        "log_every": 1,
        "eval_every": 3,
        "ckpt_every": 3,
        "warmup_steps": 1,
        "val_fraction": 0.2,
        "tensorboard": False,
    }
    t.update(train)
    return {
        "graphs": str(graph_dir),
        "run_dir": str(run_dir),
        "seed": 3,
        "model": MODEL,
        "train": t,
    }


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_rows(ref, got):
    ra = {r["step"]: r for r in ref}
    for r in got:
        for k in r:
            if k != "spots_per_s":
                assert ra[r["step"]][k] == pytest.approx(r[k], rel=1e-5, abs=1e-6), (r["step"], k)


@pytest.fixture
def one_thread():
    yield
    torch.set_num_threads(1)


def _signal_at(monkeypatch, at_step: int, sig: int):
    """Send ``sig`` to this process while the loop draws the tile of step ``at_step + 1``."""
    orig = Trainer._tile

    def tile(self, step):
        if step == at_step:
            os.kill(os.getpid(), sig)
        return orig(self, step)

    monkeypatch.setattr(Trainer, "_tile", tile)


def test_sampler_tiles_deterministic_and_disjoint_from_validation():
    g = tiny_graph(20, n_genes=8, crop_px=8)
    ix = SlideIndex(g)
    a = TileSampler([ix], 60, 2, seed=5, val_fraction=0.2)
    b = TileSampler([ix], 60, 2, seed=5, val_fraction=0.2)
    ta, tb = a.epoch_tiles(0), b.epoch_tiles(0)
    assert len(ta) == len(tb) > 3
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(ta, tb))
    assert not all(np.array_equal(x[1], y[1]) for x, y in zip(ta, a.epoch_tiles(1)))
    val = a.val_mask[0]
    assert 0 < int(val.sum()) < ix.n
    for s, core in ta:
        tile = a.build(s, core)
        n_id = tile[S.SPOT]["n_id"]
        assert not val[n_id].any()  # training tiles never touch held-out spots
        assert int(tile[S.SPOT]["core"].sum()) == len(core)
        assert len(n_id) > len(core)  # the halo
        # edges are valid local indices; patch_0 row i belongs to spot i
        for et in tile.edge_types:
            ei = tile[et].edge_index
            if ei.numel():
                assert ei[0].max() < tile[et[0]].get("n_id", tile[et[0]].get("index")).shape[0]
        assert torch.equal(tile[S.patch(0)]["n_id"], n_id)
    # ranks draw different tiles, the same number each
    r0 = TileSampler([ix], 60, 2, seed=5, rank=0, world_size=2, val_fraction=0.2).epoch_tiles(0)
    r1 = TileSampler([ix], 60, 2, seed=5, rank=1, world_size=2, val_fraction=0.2).epoch_tiles(0)
    assert len(r0) == len(r1)
    assert not np.array_equal(r0[0][1], r1[0][1])


def test_halo_is_n_hops():
    g = tiny_graph(10, n_genes=8, crop_px=8)  # 8-neighbourhood lattice
    ix = SlideIndex(g)
    centre = torch.tensor([5 * 10 + 5])
    assert ix.halo(centre, 1).numel() == 9
    assert ix.halo(centre, 2).numel() == 25


def test_apply_masks_hides_expression_and_cuts_identity_edges():
    g = tiny_graph(8, n_genes=8, crop_px=8)
    s = TileSampler([SlideIndex(g)], 30, 1, val_fraction=0.0)
    tile = s.build(*s.epoch_tiles(0)[0])
    x0 = tile[S.SPOT][S.X].float().clone()
    tile = apply_masks(
        tile, mask_ratio=0.3, anchor_fraction=0.5, generator=torch.Generator().manual_seed(0)
    )
    sp = tile[S.SPOT]
    m, a = sp["x_mask"], sp["anchor"]
    assert m.any() and a.any() and not (m & a).any()
    assert not (m & ~sp["core"]).any()
    assert (sp[S.X][m] == 0).all() and torch.equal(sp["x_target"], x0[m])
    assert not m[tile[S.SPOT_EXPRESSES_GENE].edge_index[0]].any()
    assert not m[tile[S.GENE_REV_EXPRESSES_SPOT].edge_index[1]].any()
    assert (
        tile[S.SPOT_EXPRESSES_GENE].edge_weight.shape[0]
        == tile[S.SPOT_EXPRESSES_GENE].edge_index.shape[1]
    )
    assert not a[tile[S.PATCH0_OF_SPOT].edge_index[1]].any()
    assert not a[tile[S.SPOT_REV_OF_PATCH0].edge_index[0]].any()


def test_whole_slide_tile_is_built_once_and_masking_leaves_it_intact():
    g = tiny_graph(8, n_genes=8, crop_px=8)
    s = TileSampler([SlideIndex(g)], 10_000, 2, val_fraction=0.0)  # the slide is one tile
    slide, core = s.epoch_tiles(0)[0]
    first = s.build(slide, core)
    ref = {et: first[et].edge_index.clone() for et in first.edge_types}
    x0 = first[S.SPOT][S.X].float().clone()
    apply_masks(
        first, mask_ratio=0.5, anchor_fraction=0.5, generator=torch.Generator().manual_seed(0)
    )
    second = s.build(slide, core)
    assert len(s._whole) == 1 and second is not first
    assert "x_mask" not in second[S.SPOT]
    assert torch.equal(second[S.SPOT][S.X].float(), x0)
    for et, ei in ref.items():
        assert torch.equal(second[et].edge_index, ei)


def test_pretrain_outputs_and_checkpoint(graph_dir, tmp_path):
    run = tmp_path / "run"
    path = pretrain(_cfg(graph_dir, run), progress=False)
    assert path == run / "checkpoints" / "last.pt"
    assert (run / "config.yaml").is_file()
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        for k in (
            "loss",
            "contrastive",
            "patch_region",
            "localisation",
            "masked_expression",
            "lr",
            "spots_per_s",
        ):
            assert np.isfinite(r[k]), k
    assert "val_localisation_acc" in rows[2] and "val_retrieval_top1" in rows[-1]
    assert 0.0 <= rows[-1]["val_retrieval_auc"] <= 1.0
    ck = torch.load(path, weights_only=True)
    for k in (
        "model",
        "optimizer",
        "scheduler",
        "step",
        "rng",
        "sampler",
        "config",
        "model_config",
        "build",
    ):
        assert k in ck
    assert ck["step"] == 6 and ck["build"]["genes"] == [f"G{i}" for i in range(16)]
    model, info = load_model(path)
    assert (
        info["step"] == 6
        and info["genes"] == ck["build"]["genes"]
        and len(info["checkpoint_hash"]) == 16
    )
    from tissuegraph.graph.storage import load_graph

    g = load_graph(graph_dir / "tiny0.pt")
    for kind in ("fused", "expression", "image"):
        e = embed_graph(model, g, kind=kind, batch_spots=50, device="cpu")
        assert e.shape == (196, 16) and np.isfinite(e).all() and (np.abs(e).sum(1) > 0).all()
    p = predict_graph(model, g, batch_spots=50, device="cpu")
    assert p.shape == (196, 16) and np.isfinite(p).all()
    # the loop refuses to overwrite a run without --resume
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(_cfg(graph_dir, run), progress=False)


def test_weight_zero_removes_term(graph_dir, tmp_path):
    cfg = _cfg(graph_dir, tmp_path / "r", max_steps=2, eval_every=0)
    cfg["objectives"] = {"patch_region": 0.0, "localisation": 0.0}
    pretrain(cfg, progress=False)
    r = _rows(tmp_path / "r")[-1]
    assert "patch_region" not in r and "localisation" not in r and "contrastive" in r


def test_resume_reproduces(graph_dir, tmp_path):
    a = tmp_path / "a"
    pretrain(
        _cfg(graph_dir, a, max_steps=6, ckpt_every=3, keep_step_checkpoints=True, eval_every=0),
        progress=False,
    )
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copy(a / "checkpoints" / "step_3.pt", b / "checkpoints" / "last.pt")
    pretrain(
        _cfg(graph_dir, b, max_steps=6, ckpt_every=3, keep_step_checkpoints=True, eval_every=0),
        resume=True,
        progress=False,
    )
    ra = {r["step"]: r for r in _rows(a)}
    rb = {r["step"]: r for r in _rows(b)}
    assert sorted(rb) == [4, 5, 6]
    for s in rb:
        for k in ("loss", "contrastive", "masked_expression", "localisation", "lr"):
            assert ra[s][k] == pytest.approx(rb[s][k], rel=1e-5, abs=1e-6), (s, k)
    wa = torch.load(a / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wa)


def test_bad_inputs_write_nothing(graph_dir, tmp_path):
    run = tmp_path / "run"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="manifest"):
        Trainer(_cfg(empty, run))
    bad = tmp_path / "bad"
    shutil.copytree(graph_dir, bad)
    man = json.loads((bad / "manifest.json").read_text())
    man["schema_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(InputError, match="schema_version"):
        Trainer(_cfg(bad, run))
    cfg = _cfg(graph_dir, run)
    cfg["model"] = dict(MODEL, image_encoder={"name": "resnet18x"})
    with pytest.raises(ConfigError, match="close matches"):
        Trainer(cfg)
    with pytest.raises(InputError, match="checkpoint not found"):
        Trainer(_cfg(graph_dir, run), resume=True)
    assert not run.exists()


def test_resume_with_other_panel_fails(graph_dir, tmp_path):
    run = tmp_path / "run"
    pretrain(_cfg(graph_dir, run, max_steps=1, eval_every=0), progress=False)
    other = tmp_path / "other"
    write_graph_dir([tiny_graph(12, n_genes=20, crop_px=16)], other)
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(InputError, match="panel"):
        pretrain(_cfg(other, run, max_steps=2), resume=True, progress=False)
    cfg = _cfg(graph_dir, run, max_steps=2)
    cfg["model"] = dict(MODEL, hidden_dim=32)
    with pytest.raises(ConfigError, match="model"):
        pretrain(cfg, resume=True, progress=False)
    assert (run / "metrics.jsonl").read_text() == before


def test_nonfinite_loss_names_the_term(graph_dir, tmp_path, monkeypatch):
    from tissuegraph.train import objectives

    orig = objectives.Objectives.forward

    def broken(self, tile):
        out = orig(self, tile)
        out["localisation"] = out["localisation"] * float("nan")
        return out

    monkeypatch.setattr(objectives.Objectives, "forward", broken)
    with pytest.raises(TissueGraphError, match="localisation"):
        pretrain(_cfg(graph_dir, tmp_path / "r", max_steps=3), progress=False)


def test_ddp_gloo_two_processes_identical_weights(graph_dir, tmp_path, torchrun_two):
    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, torch
        torch.set_num_threads(1)
        from tissuegraph.train.loop import Trainer
        cfg = {_cfg(graph_dir, tmp_path / "run", max_steps=3, eval_every=0, ckpt_every=0)!r}
        tr = Trainer(cfg, progress=False)
        tr.fit()
        rank = int(os.environ["RANK"])
        torch.save({{n: p.detach().clone() for n, p in tr.model.named_parameters()}},
                   "{tmp_path}/rank%d.pt" % rank)
        torch.save(torch.tensor(tr.sampler.epoch_tiles(0)[0][1]), "{tmp_path}/tile%d.pt" % rank)
    """)
    )
    w0, w1 = torchrun_two(script, tmp_path)
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert not torch.equal(torch.load(tmp_path / "tile0.pt"), torch.load(tmp_path / "tile1.pt"))
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]


# ------------------------------------------------------------------------------ long runs
def test_sigint_saves_checkpoint_and_resume_reproduces(graph_dir, tmp_path, capsys):
    """Ctrl-C in the CLI finishes the step, writes last.pt and exits 130 with one line; the
    resumed run's metric rows equal those of an uninterrupted run."""
    ref = tmp_path / "ref"
    kw = {"max_steps": 6, "ckpt_every": 0, "ckpt_every_min": 0, "eval_every": 3}
    pretrain(_cfg(graph_dir, ref, **kw), progress=False)

    run = tmp_path / "run"
    cfg_file = tmp_path / "cfg.json"  # JSON is YAML
    cfg_file.write_text(json.dumps(_cfg(graph_dir, run, **kw)))
    script = tmp_path / "interrupt.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal, sys, torch
        torch.set_num_threads(1)
        from tissuegraph.cli import main
        from tissuegraph.train.loop import Trainer
        orig = Trainer._tile
        def tile(self, step):
            if step == 3:  # during the 4th step
                os.kill(os.getpid(), signal.SIGINT)
            return orig(self, step)
        Trainer._tile = tile
        sys.exit(main(["pretrain", "--config", {str(cfg_file)!r}, "--quiet"]))
    """)
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240
    )
    assert res.returncode == 130, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "SIGINT" in last and "step 4 of 6" in last and "--resume" in last, last
    assert str(run / "checkpoints" / "last.pt") in last
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4]

    from tissuegraph.cli import main

    capsys.readouterr()
    assert main(["pretrain", "--config", str(cfg_file), "--resume"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == (
        f"pretrain: wrote {run / 'checkpoints' / 'last.pt'}; metrics {run / 'metrics.jsonl'}"
    )
    # the bar starts at the checkpoint's step, counts to max_steps and shows a rate
    assert "4/6" in err and "6/6" in err and "step/s" in err
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    _same_rows(_rows(ref), rows)
    wa = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wa)


def test_sigterm_in_process_raises_after_checkpoint(graph_dir, tmp_path, monkeypatch):
    _signal_at(monkeypatch, 1, signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    run = tmp_path / "r"
    with pytest.raises(TrainingInterrupted, match="SIGTERM") as info:
        pretrain(_cfg(graph_dir, run, max_steps=5, eval_every=0, ckpt_every=0), progress=False)
    assert info.value.step == 2 and info.value.signum == signal.SIGTERM
    assert info.value.checkpoint == run / "checkpoints" / "last.pt"
    assert torch.load(info.value.checkpoint, weights_only=True)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == before  # handlers are restored


def test_time_based_checkpoints(graph_dir, tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(loop_mod, "_clock", lambda: now[0])
    orig = Trainer._tile

    def tile(self, step):
        now[0] += 4 * 60.0  # every step "takes" four minutes
        return orig(self, step)

    saved = []
    orig_ckpt = Trainer._checkpoint

    def spy(self, path, rngs):
        saved.append((self.step, path.name))
        return orig_ckpt(self, path, rngs)

    monkeypatch.setattr(Trainer, "_tile", tile)
    monkeypatch.setattr(Trainer, "_checkpoint", spy)
    cfg = _cfg(graph_dir, tmp_path / "r", max_steps=7, eval_every=0, ckpt_every=0)
    cfg["train"]["ckpt_every_min"] = 10
    pretrain(cfg, progress=False)
    # due once 10 min have passed since the last one (checked as a step starts): 3, 6, end
    assert saved == [(3, "last.pt"), (6, "last.pt"), (7, "last.pt")]


def test_warmup_clamp_and_threads_under_two_local_ranks(
    graph_dir, tmp_path, monkeypatch, one_thread
):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    loop_mod.log.addHandler(handler)
    try:
        tr = Trainer(_cfg(graph_dir, tmp_path / "r", max_steps=10, warmup_steps=5))
        assert seen == ["train.warmup_steps=5 is more than a fifth of train.max_steps=10: using 2"]
        assert tr.cfg.train.warmup_steps == 2
        assert tr.scheduler.lr_lambdas[0](1) == pytest.approx(1.0)  # warm-up over after 2 steps
        assert tr.threads == 2 and torch.get_num_threads() == 2
        tr = Trainer(_cfg(graph_dir, tmp_path / "r", max_steps=10, warmup_steps=2, threads=1))
        assert len(seen) == 1
        assert tr.threads == 1 and torch.get_num_threads() == 1
    finally:
        loop_mod.log.removeHandler(handler)
    with pytest.raises(ConfigError, match="threads"):
        Trainer(_cfg(graph_dir, tmp_path / "r", threads=-1))


def test_ddp_interrupt_on_one_rank_stops_all(graph_dir, tmp_path, torchrun_two):
    """A signal seen by rank 1 alone stops both ranks after the same step; rank 0 writes."""
    script = tmp_path / "ddp_stop.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal, torch
        from tissuegraph.train.loop import Trainer, TrainingInterrupted
        rank = int(os.environ["RANK"])
        orig = Trainer._tile
        def tile(self, step):
            if step == 1 and rank == 1:
                os.kill(os.getpid(), signal.SIGINT)
            return orig(self, step)
        Trainer._tile = tile
        cfg = {_cfg(graph_dir, tmp_path / "run", max_steps=5, eval_every=0, ckpt_every=0)!r}
        tr = Trainer(cfg, progress=False)
        try:
            tr.fit()
        except TrainingInterrupted as exc:
            open("{tmp_path}/stopped%d" % rank, "w").write(str(exc.step))
    """)
    )
    torchrun_two(script)
    assert (tmp_path / "stopped0").read_text() == (tmp_path / "stopped1").read_text() == "2"
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["step"] == 2 and ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2]


def test_rank_fraction():
    from tissuegraph.train.evaluate import rank_fraction

    sim = torch.tensor([[3.0, 1.0, 2.0], [5.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    # row 0: partner first; row 1: partner last; row 2: all tied
    assert rank_fraction(sim).tolist() == [1.0, 0.0, 0.5]
    g = torch.Generator().manual_seed(0)
    r = rank_fraction(torch.randn(400, 400, generator=g))
    assert abs(float(r.mean()) - 0.5) < 0.03
