"""The optional peers of ``domains_dlpfc.py``: option parsing, the peer-environment probe, the
barcode alignment and the subprocess path (with a stand-in for ``run_peer.py``; the real peers
live in a separate environment and are not needed here)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH / "peers"))

import domains_dlpfc as dom  # noqa: E402
import run_peer  # noqa: E402


# ----------------------------------------------------------------------------- alignment
def test_align_rep_reorders_and_drops_extras():
    rep = np.arange(8, dtype=np.float32).reshape(4, 2)
    out = dom.align_rep(rep, ["c", "a", "x", "b"], ["a", "b", "c"])
    np.testing.assert_array_equal(out, rep[[1, 3, 0]])


def test_align_rep_refuses_missing_or_duplicate_barcodes():
    rep = np.zeros((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="1 of 3 spots not in the peer output"):
        dom.align_rep(rep, ["a", "b", "c"], ["a", "b", "z"])
    with pytest.raises(ValueError, match="occurs twice"):
        dom.align_rep(rep, ["a", "a", "c"], ["a", "c"])
    with pytest.raises(ValueError, match="embedding rows"):
        dom.align_rep(rep, ["a", "b"], ["a"])


def test_one_line_keeps_the_exception_line():
    tb = "Traceback (most recent call last):\n  File x\nValueError: bad panel\n\n"
    assert dom.one_line(tb) == "ValueError: bad panel"
    assert dom.one_line("") == "no output"
    assert len(dom.one_line("x" * 1000)) == 300


# ----------------------------------------------------------------------------- options
def test_no_peer_python_means_a_note(monkeypatch):
    monkeypatch.delenv(dom.PEER_PYTHON_ENV, raising=False)
    assert dom.resolve_peer_python(None) is None
    installed, reason = dom.probe_peers(None)
    assert installed == {} and "no peer environment" in reason
    notes = dom.peer_notes(dom.Settings(), reason)
    assert len(notes) == 1
    assert all(p in notes[0] for p in dom.PEERS) and "benchmarks/peers/README.md" in notes[0]


def test_peer_python_from_option_or_environment(monkeypatch):
    monkeypatch.setenv(dom.PEER_PYTHON_ENV, "/env/bin/python")
    assert dom.resolve_peer_python(None) == "/env/bin/python"
    assert dom.resolve_peer_python("/opt/bin/python") == "/opt/bin/python"
    s = dom.settings_from_args(dom.parse_args([]))
    assert s.peer_python == "/env/bin/python"
    assert s.peer_seeds is None and dom.peer_seed_list(s) == s.seeds
    assert s.peers == []  # chosen in main() from what the peer environment has


def test_peer_options_parse(monkeypatch):
    monkeypatch.delenv(dom.PEER_PYTHON_ENV, raising=False)
    a = dom.parse_args(
        ["--peer-python", "/p", "--peers", "STAGATE", "BANKSY", "--peer-seeds", "1"]
        + ["--peer-threads", "1", "--peer-cache", "/tmp/c", "--seeds", "3"]
    )
    s = dom.settings_from_args(a)
    assert a.peers == ["STAGATE", "BANKSY"]
    assert s.peer_python == "/p" and s.peer_cache == "/tmp/c" and s.peer_threads == 1
    assert s.seeds == [0, 1, 2] and dom.peer_seed_list(s) == [0]
    a = dom.parse_args(["--peers-only", "--peers"])
    s = dom.settings_from_args(a)
    assert a.peers == [] and s.methods == [] and s.protocols == ["per_section"]
    with pytest.raises(SystemExit):
        dom.parse_args(["--peer-seeds", "0"])
    with pytest.raises(SystemExit):
        dom.parse_args(["--peers", "NotAPeer"])


def test_select_peers():
    installed = {"STAGATE": "1.0", "BANKSY": "1.3"}
    assert dom.select_peers(None, installed) == (["STAGATE", "BANKSY"], [])
    run, notes = dom.select_peers(["BANKSY", "GraphST"], installed)
    assert run == ["BANKSY"] and len(notes) == 1 and "GraphST not run" in notes[0]
    with pytest.raises(ValueError, match="unknown peer"):
        dom.select_peers(["SpaGCN"], installed)


def test_run_peer_helpers():
    assert run_peer.parse_sets(["lambda=0.8", "n_epochs=20", "decay=uniform"]) == {
        "lambda": 0.8,
        "n_epochs": 20,
        "decay": "uniform",
    }
    with pytest.raises(ValueError):
        run_peer.parse_sets(["lambda"])
    assert set(run_peer.RUNNERS) == set(dom.PEERS) == set(run_peer.PEERS)
    assert set(dom.PEER_RECIPES) == set(dom.PEERS)


def test_run_peer_reads_the_spots_tissuegraph_reads(dlpfc_dir):
    """The peer script (scanpy's reader) and tissuegraph see the same spots in the same order."""
    from tissuegraph.io import read_visium

    ours = read_visium(dlpfc_dir, library_id="151673")
    theirs = run_peer.read_section(dlpfc_dir)
    assert list(theirs.obs_names) == list(ours.obs_names)
    np.testing.assert_allclose(theirs.obsm["spatial"], ours.obsm["spatial"])
    assert set(ours.var_names) <= set(theirs.var_names)
    assert theirs.uns["microns_per_pixel"] == pytest.approx(100 / 138, rel=0.05)
    patch = run_peer.subset_spots(theirs, 300)
    assert patch.n_obs == 300 and patch.obs_names.isin(theirs.obs_names).all()


# ----------------------------------------------------------------------------- subprocess path
FAKE_PEER = '''
"""Stand-in for run_peer.py: the truth one-hot plus noise, rows in reversed order."""
import argparse, json, sys
from pathlib import Path
import numpy as np

p = argparse.ArgumentParser()
for opt in ("--peer", "--section-dir", "--genes", "--seed", "--out", "--threads"):
    p.add_argument(opt)
p.add_argument("--list", action="store_true")
a = p.parse_args()
here = Path(__file__).parent
if a.list:
    print(json.dumps({"BANKSY": "9.9", "GraphST": "1.0", "STAGATE": None}))
    sys.exit(0)
with open(here / "calls.txt", "a") as fh:
    fh.write(a.peer + "\\n")
if a.peer == "GraphST":
    raise ValueError("GraphST stand-in fails on purpose")
src = np.load(here / "source.npz")
rng = np.random.default_rng(int(a.seed))
rep = src["rep"] + 0.05 * rng.normal(size=src["rep"].shape)
assert len(Path(a.genes).read_text().split()) > 0
np.savez(a.out, rep=rep[::-1].astype(np.float32), obs_names=src["obs_names"][::-1],
         seconds=1.5, peer=a.peer, version="9.9", params=json.dumps({"x": 1}), n_genes=30,
         threads=int(a.threads), seed=int(a.seed))
'''


@pytest.fixture
def fake_peer(tmp_path, monkeypatch):
    script = tmp_path / "fake_run_peer.py"
    script.write_text(textwrap.dedent(FAKE_PEER))
    monkeypatch.setattr(dom, "PEER_SCRIPT", script)
    return tmp_path


@pytest.fixture
def synthetic_section(tmp_path):
    from tissuegraph.datasets import simulate_slide
    from tissuegraph.graph.config import SlideSpec

    adata = simulate_slide(300, image=False, n_genes=60, seed=3, library_id="A")
    adata.obs[dom.TRUTH] = adata.obs["true_niche"].astype(str).to_numpy()
    return dom.Section("A", adata, SlideSpec(name="A", format="h5ad", path=str(tmp_path)))


def test_peers_run_scored_cached_and_failures_recorded(fake_peer, synthetic_section, tmp_path):
    sec = synthetic_section
    truth = sec.adata.obs[dom.TRUTH].to_numpy()
    onehot = (truth[:, None] == np.unique(truth)[None, :]).astype(np.float32)
    obs_names = np.asarray(sec.adata.obs_names, dtype=str)
    np.savez(fake_peer / "source.npz", rep=onehot, obs_names=obs_names)

    installed, reason = dom.probe_peers(sys.executable)
    assert reason is None and installed == {"BANKSY": "9.9", "GraphST": "1.0"}
    peers, _ = dom.select_peers(None, installed)
    s = dom.Settings(
        k=5,
        seeds=[0, 1],
        peer_seeds=[0],
        n_top=30,
        n_pcs=10,
        n_init=1,
        restarts=1,
        methods=[],
        protocols=["per_section", "transfer"],
        peers=peers,
        peer_python=sys.executable,
        peer_cache=str(tmp_path / "cache"),
        peer_versions=installed,
    )
    runs = dom.run([sec], s, tmp_path / "work")
    ok = [r for r in runs if r.get("status") == "ok"]
    failed = [r for r in runs if r.get("status") == "failed"]
    # one peer, one seed, clustered with every scale setting like the other methods
    assert [(r["method"], r["seed"]) for r in ok] == [("BANKSY", 0)] * len(s.scales)
    assert {r["scale"] for r in ok} == set(s.scales)
    for r in ok:
        assert r["ari"] > 0.9  # the alignment undid the reversed order
        assert r["train_s"] == 1.5 and r["peer_version"] == "9.9" and not r["peer_cached"]
        assert r["protocol"] == "per_section" and r["dim"] == onehot.shape[1]
    assert len(failed) == 1 and failed[0]["method"] == "GraphST"
    assert "fails on purpose" in failed[0]["reason"] and "\n" not in failed[0]["reason"]

    # a rerun reuses the cached embedding (no new BANKSY call), the failure is retried
    calls = (fake_peer / "calls.txt").read_text().split()
    assert sorted(calls) == ["BANKSY", "GraphST"]
    again = dom.run([sec], s, tmp_path / "work2")
    assert (fake_peer / "calls.txt").read_text().split() == calls + ["GraphST"]
    assert all(r["peer_cached"] for r in again if r.get("status") == "ok")

    cols, rows, _ = dom.summarise(runs, s)
    by_method = {}
    for row in rows:
        by_method.setdefault((row[0], row[2]), []).append(row)
    assert len(by_method[("per_section", "BANKSY")]) == len(s.scales)
    assert by_method[("per_section", "GraphST")][0][4].startswith("failed (seed 0)")
    assert "not applicable" in by_method[("transfer", "BANKSY")][0][4]
    notes = dom.peer_notes(s)
    assert any("per-section only" in n for n in notes)
    assert any(n.startswith("BANKSY 9.9:") for n in notes)
