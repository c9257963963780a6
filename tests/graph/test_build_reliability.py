"""build-graphs on bad input (a one-line error, nothing written) and on an up-to-date folder
(nothing rewritten)."""

from __future__ import annotations

import gzip
import warnings

import pytest

from tissuegraph.cli import main
from tissuegraph.graph import schema as S
from tissuegraph.graph.storage import load_graph


def _snapshot(folder):
    return {
        p.name: (p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes())
        for p in sorted(folder.iterdir())
    }


def test_rebuild_of_an_up_to_date_folder_touches_no_file(tmp_path, data_dir, capsys):
    out = tmp_path / "graphs"
    cfg = tmp_path / "build.yaml"
    cfg.write_text(
        f"""out_dir: {out}
slides:
  - {{name: sim, format: synthetic, n_spots: 150, seed: 1}}
  - {{name: toy, format: visium, path: {data_dir / "visium_toy"}}}
panel: {{n_top: 50, fit_slides: [toy]}}
patches: {{sizes_um: [110.0, 330.0], crop_px: 8}}
"""
    )
    assert main(["build-graphs", "--config", str(cfg), "--quiet"]) == 0
    before = _snapshot(out)
    assert {"sim.pt", "toy.pt", S.MANIFEST, S.RESOLVED_CONFIG} <= set(before)
    assert main(["build-graphs", "--config", str(cfg), "--quiet"]) == 0
    assert _snapshot(out) == before
    # a changed option rewrites what it changes
    assert main(["build-graphs", "--config", str(cfg), "--quiet", "spatial.method=knn"]) == 0
    after = _snapshot(out)
    assert after[S.RESOLVED_CONFIG] != before[S.RESOLVED_CONFIG]
    assert after["toy.pt"] != before["toy.pt"]
    capsys.readouterr()


def _st_case(tmp_path, her2st_dir, value):
    """her2st C2 with one counts cell set to ``value`` (text edit, written uncompressed)."""
    lines = gzip.open(her2st_dir / "C2" / "counts.tsv.gz", "rt").read().splitlines()
    fields = lines[3].split("\t")
    fields[20] = value
    lines[3] = "\t".join(fields)
    counts = tmp_path / "counts.tsv"
    counts.write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "build.yaml"
    cfg.write_text(
        f"""out_dir: {tmp_path / "graphs"}
slides:
  - name: c2
    format: st
    counts: {counts}
    spots: {her2st_dir / "C2" / "spots.tsv"}
patches: {{enabled: false}}
"""
    )
    return cfg, counts, fields[0], lines[0].split("\t")[20]


@pytest.mark.parametrize(("value", "kind"), [("nan", "NaN"), ("-4", "negative")])
def test_st_bad_count_refused_by_build_graphs(tmp_path, her2st_dir, capsys, value, kind):
    cfg, counts, spot, gene = _st_case(tmp_path, her2st_dir, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy log1p warning: the value never gets there
        rc = main(["build-graphs", "--config", str(cfg), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{counts}: 1 invalid value(s) in the counts (1 {kind})" in err
    assert f"spot {spot!r}, gene {gene!r}" in err
    assert "Traceback" not in err and "RuntimeWarning" not in err
    out = tmp_path / "graphs"
    assert not out.exists() or not any(out.iterdir())


def test_st_clean_counts_build(tmp_path, her2st_dir, capsys):
    """The same edit with a valid count builds, and spot.x is finite."""
    import torch

    cfg, *_ = _st_case(tmp_path, her2st_dir, "7")
    assert main(["build-graphs", "--config", str(cfg), "--quiet"]) == 0
    g = load_graph(tmp_path / "graphs" / "c2.pt")
    assert torch.isfinite(g[S.SPOT].x.float()).all()
    capsys.readouterr()


def test_versions_warn_nothing():
    """The manifest's package versions come from metadata: no deprecated ``__version__``
    access (anndata's warns), and the same answer whether or not anndata was imported."""
    import anndata  # noqa: F401  (imported: the case that used to warn)

    from tissuegraph.graph.pipeline import _versions

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = _versions()
    assert v["anndata"] and v["torch"] and v["numpy"]
