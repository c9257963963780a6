"""Smoke tests of the benchmark scripts: small inputs, real code paths, checked outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _common  # noqa: E402
import image_to_expression_her2st as her  # noqa: E402
import niche_enrichment as ne  # noqa: E402
import report  # noqa: E402
import scale  # noqa: E402


def test_measure_sees_allocation():
    with _common.measure(trace_python=True) as m:
        x = np.ones((2000, 2000))  # 30 MB
        x += 1
    assert m.seconds >= 0
    assert m.py_heap_peak_mb is not None and m.py_heap_peak_mb > 25
    assert m.peak_rss_mb >= m.start_rss_mb


def test_loglog_slope():
    n = [1e4, 1e5, 1e6]
    assert _common.loglog_slope(n, [2 * v for v in n]) == pytest.approx(1.0)
    assert _common.loglog_slope(n, [v**2 for v in n]) == pytest.approx(2.0)
    assert _common.loglog_slope([1e4], [1.0]) is None


@pytest.mark.interop  # runs squidpy (bench group)
def test_niche_enrichment_case_and_report(tmp_path):
    adata = ne.case_synthetic(1500)
    rec = ne.bench_case(adata, n_perms=200, repeats=1)
    assert rec["counts_equal"]  # same graph and labels: identical observed counts
    assert rec["zscore_corr"] > 0.95 and rec["zscore_corr_permutation"] > 0.95
    assert rec["speed_ratio"] > 0
    cols, rows, targets = ne.summarise([rec])
    out = _common.write_results(
        tmp_path / "niche_enrichment_quick.json",
        benchmark="niche_enrichment",
        title=ne.TITLE,
        quick=True,
        params={"n_perms": 200},
        runs=[rec],
        table=(cols, rows),
        targets=targets,
        argv=["benchmarks/niche_enrichment.py", "--quick"],
    )
    doc = json.loads(out.read_text())
    assert doc["mode"] == "quick" and doc["machine"]["cpu_count"] >= 1
    assert doc["command"].startswith("uv run --group bench python benchmarks/niche_enrichment.py")
    text = report.render(tmp_path)
    assert ne.TITLE in text and "quick run" in text
    assert ("**met**" in text) or ("**missed**" in text)


def test_report_prefers_full_and_reads_foreign_files(tmp_path):
    base = {"benchmark": "scale", "title": "Scaling", "table": {"columns": ["a"], "rows": [[1]]}}
    (tmp_path / "scale_quick.json").write_text(json.dumps({**base, "mode": "quick", "date": "Q"}))
    (tmp_path / "scale.json").write_text(
        json.dumps(
            {
                **base,
                "mode": "full",
                "date": "F",
                "targets": [{"name": "t", "value": 2.0, "target": 1.0, "op": ">=", "met": True}],
            }
        )
    )
    (tmp_path / "build_graphs.json").write_text(
        json.dumps({"runs": [{"slides": 2, "seconds": 1.5, "nested": {"x": 1}}]})
    )
    report.main(["--results", str(tmp_path)])
    text = (tmp_path / report.OUT_NAME).read_text()
    assert "date: F" in text and "date: Q" not in text
    assert "**met**" in text
    assert "| slides | seconds |" in text  # generic rendering, nested fields left out


def test_scale_summary_flags_superlinear():
    runs = [
        {
            "n_spots": n,
            "status": "ok",
            "ru_maxrss_mb": 100.0,
            "stages": {
                st: {"seconds": t, "peak_rss_mb": n / 100, "added_rss_mb": n / 200}
                for st, t in (("build", n / 1e3), ("train", (n / 1e3) ** 1.5), ("embed", n / 1e4))
            },
        }
        for n in (10_000, 100_000)
    ]
    cols, rows, targets, slopes = scale.summarise(runs)
    assert slopes["build"]["time"] == pytest.approx(1.0)
    assert slopes["train"]["time"] == pytest.approx(1.5)
    met = {t.name.split()[0]: t.met for t in targets}
    assert met["build"] and not met["train"]


def test_scale_worker_small(tmp_path):
    """All stages of one size, in-process (the benchmark runs this in a subprocess)."""
    part = tmp_path / "part.json"
    scale.worker(900, tmp_path, part, batch_spots=256, n_genes=60, overrides=[])
    rec = json.loads(part.read_text())
    assert rec["status"] == "ok"
    assert set(scale.STAGES) <= set(rec["stages"])
    assert rec["stages"]["train"]["steps"] == 4
    assert rec["stages"]["embed"]["dim"] > 0


def test_pearson_and_probe_scores():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(100, 4))
    yhat = y.copy()
    yhat[:, 1] = -y[:, 1]
    yhat[:, 3] = 0.0  # constant prediction: not scored
    s = her.score(y, yhat, ["a", "b", "c", "d"])
    assert s["n_genes_scored"] == 3
    assert s["pearson"] == pytest.approx((1 - 1 + 1) / 3)
    assert s["per_gene"]["d"] is None


def _her_sections(tmp_path):
    from tissuegraph.datasets import simulate_slide
    from tissuegraph.graph.config import SlideSpec
    from tissuegraph.io import write_h5ad

    sections = []
    for i, name in enumerate(("S1", "S2", "S3")):
        adata = simulate_slide(150, image=True, n_genes=60, seed=10 + i, library_id=name)
        path = tmp_path / f"{name}.h5ad"
        write_h5ad(adata, path)
        sections.append(
            her.Section(name, adata, SlideSpec(name=name, format="h5ad", path=str(path)))
        )
    return sections


@pytest.mark.interop  # squidpy's image features (bench group)
def test_image_to_expression_squidpy_features(tmp_path):
    sections = _her_sections(tmp_path)
    s = her.Settings(n_genes=20, methods=["squidpy_features"], squidpy_features=["summary"])
    (run,) = her.run_fold(sections[0], sections[1:], s, tmp_path / "work", {})
    assert run["method"] == "squidpy_features" and run["held_out"] == "S1"
    assert run["n_features"] > 0 and np.isfinite(run["pearson"]) and -1 <= run["pearson"] <= 1


def test_image_to_expression_fold_synthetic(tmp_path):
    """One leave-one-out fold on three small simulated slides with images, every method
    but squidpy's features (an interop test, above)."""
    sections = _her_sections(tmp_path)
    methods = [m for m in her.METHODS if m != "squidpy_features"]
    s = her.Settings(n_genes=20, steps=2, methods=methods)
    runs = her.run_fold(sections[0], sections[1:], s, tmp_path / "work", {})
    assert {r["method"] for r in runs} == set(methods)
    for r in runs:
        assert r["held_out"] == "S1" and "S1" not in r["train"]
        assert np.isfinite(r["pearson"]) and -1 <= r["pearson"] <= 1
    cols, rows, targets = her.summarise(runs, s)
    assert len(rows) == len(methods) and len(targets) == 3


def test_pretrain_throughput_small(tmp_path):
    """Every configuration of the throughput benchmark (2 steps each, channels-last variant,
    STAGATE not run) on a small simulated slide with an image; results file and targets."""
    import pretrain_throughput as pt

    from tissuegraph.datasets import simulate_slide
    from tissuegraph.graph.config import SlideSpec
    from tissuegraph.io import write_h5ad

    adata = simulate_slide(150, image=True, n_genes=60, seed=3, library_id="S1")
    write_h5ad(adata, tmp_path / "S1.h5ad")
    spec = SlideSpec(name="S1", format="h5ad", path=str(tmp_path / "S1.h5ad"))
    s = pt.Settings.quick_settings(
        threads=1, n_top=40, recipe_steps=2, channels_last=True, gpu=False
    )
    runs, info = pt.run(spec, tmp_path / "work", s)
    by = {r["config"]: r for r in runs}
    assert set(by) == {"recipe", "frozen", "pixel", "pixel_channels_last", "gatv2_ae", "stagate"}
    for name in ("recipe", "frozen", "pixel", "pixel_channels_last", "gatv2_ae"):
        assert by[name]["status"] == "ok", by[name]
        assert by[name]["spots_per_s"] > 0
    assert by["stagate"]["status"].startswith("not run")
    cols, rows, targets, notes = pt.summarise(runs, info, s)
    assert len(rows) == len(runs) and len(targets) == 3
    assert any("647" in n for n in notes) and any("GPU: not run" in n for n in notes)
    out = _common.write_results(
        tmp_path / "pretrain_throughput_quick.json",
        benchmark=pt.NAME,
        title=pt.TITLE,
        quick=True,
        params={},
        runs=runs,
        table=(cols, rows),
        targets=targets,
        notes=notes,
        extra=info,
    )
    doc = json.loads(out.read_text())
    assert doc["gpu"]["status"].startswith("GPU: not run")
    assert pt.TITLE in report.render(tmp_path)
