"""Sharded build-graphs (``--shard INDEX/COUNT`` then ``--merge``) equals an unsharded build."""

from __future__ import annotations

import hashlib
import json

import pytest

from tissuegraph.cli import main
from tissuegraph.graph import schema as S
from tissuegraph.graph.pipeline import shard_manifest_path

SLIDES = "\n".join(
    f"  - {{name: s{i}, format: synthetic, n_spots: {90 + 10 * i}, seed: {i}}}" for i in range(5)
)


def _config(tmp_path, out, extra: str = "") -> str:
    cfg = tmp_path / f"build_{out.name}.yaml"
    cfg.write_text(
        f"""out_dir: {out}
slides:
{SLIDES}
panel: {{n_top: 30, fit_slides: [s0, s3]}}
normalize: {{n_pcs: 4}}
patches: {{enabled: false}}
{extra}
"""
    )
    return str(cfg)


def _digest(folder) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob(f"*{S.GRAPH_SUFFIX}"))
    }


def _comparable(manifest: dict) -> dict:
    m = json.loads(json.dumps(manifest))
    for e in m["slides"]:
        e.pop("seconds")
    return m


def test_two_shards_then_merge_equal_the_unsharded_build(tmp_path, capsys):
    ref, out = tmp_path / "ref", tmp_path / "sharded"
    assert main(["build-graphs", "--config", _config(tmp_path, ref), "--quiet"]) == 0
    cfg = _config(tmp_path, out)
    for shard in ("1/2", "0/2"):
        assert main(["build-graphs", "--config", cfg, "--shard", shard, "--quiet"]) == 0
    part = json.loads(shard_manifest_path(out, 1, 2).read_text())
    assert [e["name"] for e in part["slides"]] == ["s1", "s3"]
    assert part["shard"] == {"index": 1, "count": 2, "complete": True}
    assert part["standardize"] is None  # fitted by the merge, which sees every fit slide
    assert not (out / S.MANIFEST).exists()
    assert main(["build-graphs", "--config", cfg, "--merge", "--quiet"]) == 0
    a = json.loads((ref / S.MANIFEST).read_text())
    b = json.loads((out / S.MANIFEST).read_text())
    assert a["build_config"].pop("out_dir") != b["build_config"].pop("out_dir")
    assert _comparable(a) == _comparable(b)  # same hashes, panel, statistics, slide records
    assert a["standardize"]["n_pcs"] == 4 and len(a["genes"]) == 30
    assert _digest(ref) == _digest(out) and len(_digest(ref)) == 5  # byte-identical graphs
    e = a["slides"][2]
    assert e["panel_hash"] == a["panel_hash"] and e["n_spots"] == 110
    assert e["data_spec"]["n_genes"] == 30 and e["data_spec"]["patch_input"] is None
    capsys.readouterr()


def test_merge_refuses_a_shard_with_another_panel(tmp_path, capsys):
    out = tmp_path / "g"
    cfg = _config(tmp_path, out)
    assert main(["build-graphs", "--config", cfg, "--shard", "0/2", "--quiet"]) == 0
    assert main(["build-graphs", "--config", cfg, "--shard", "1/2", "-q", "panel.n_top=20"]) == 0
    capsys.readouterr()
    assert main(["build-graphs", "--config", cfg, "--merge", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(shard_manifest_path(out, 1, 2)) in err and "panel" in err, err
    assert not (out / S.MANIFEST).exists()


def test_merge_refuses_a_missing_shard_and_bad_shard_arguments(tmp_path, capsys):
    out = tmp_path / "g"
    cfg = _config(tmp_path, out)
    assert main(["build-graphs", "--config", cfg, "--shard", "0/3", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["build-graphs", "--config", cfg, "--merge", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "shard 1 of 3 is missing" in err and len(err.splitlines()) == 1, err
    for bad in ("3/3", "x/2", "1"):
        assert main(["build-graphs", "--config", cfg, "--shard", bad, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--shard" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("world", [2])
def test_torchrun_environment_selects_the_shard(tmp_path, monkeypatch, world, capsys):
    """Under torchrun (RANK / WORLD_SIZE set) each process builds its shard."""
    from tissuegraph import cli

    out = tmp_path / "g"
    cfg = _config(tmp_path, out)
    monkeypatch.setattr(cli, "_barrier", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    for rank in (1, 0):  # rank 0 merges after the barrier
        monkeypatch.setenv("RANK", str(rank))
        assert main(["build-graphs", "--config", cfg, "--quiet"]) == 0
    m = json.loads((out / S.MANIFEST).read_text())
    assert [e["name"] for e in m["slides"]] == [f"s{i}" for i in range(5)]
    capsys.readouterr()


def test_tasks_carry_their_own_spec_not_the_whole_slide_list(tmp_path):
    """The per-slide config is the build config without ``slides`` (a 1,000-slide build would
    otherwise convert and pickle the whole list once per slide)."""
    from tissuegraph.config import load_config
    from tissuegraph.graph.config import BuildConfig
    from tissuegraph.graph.pipeline import BuildPlan

    cfg = load_config(BuildConfig, _config(tmp_path, tmp_path / "g"))
    plan = BuildPlan.from_config(cfg, progress=False)
    tasks, entries = plan.tasks()
    assert [t["spec"]["name"] for t in tasks] == [f"s{i}" for i in range(5)] and not entries
    assert all(t["cfg"]["slides"] == [] for t in tasks)
    assert {k: v for k, v in tasks[0]["cfg"].items() if k != "slides"} == {
        k: v for k, v in plan.plain.items() if k != "slides"
    }
