"""Fuzzing the readers and build-graphs with damaged copies of real files.

Every case copies a small subset of a real dataset (Space Ranger HDF5 ``visium_toy``, the Space
Ranger 3.0 matrix-market folder ``visium_sr3_mtx``, her2st ST tables + H&E, an h5ad) to a
fresh folder, applies one or two mutations (truncation, bit flips, empty or missing files and
folders, dropped / renamed columns, shuffled rows, wrong dtypes, NaN / negative / fractional
counts, images of the wrong size or mode, damaged HDF5 datasets, bad scale factors) and runs a
reader or build-graphs on it. It must end in a valid AnnData / graph, or in a one-line
``InputError`` / ``ConfigError`` naming a path of the case; a failed build-graphs must leave
no file in its output folder.

Hypothesis runs with a fixed seed (``derandomize=True``) and no example database, so CI sees
the same cases every run; ``pytest -m slow tests/io/test_fuzz.py`` runs a ten times larger
search. The figures (cases, outcome types, partial outputs) are printed at the end of the
session and written as JSON to ``$TISSUEGRAPH_FUZZ_REPORT`` when it is set.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pytest
from _fuzz import (
    TARGETS,
    FuzzStats,
    apply_mutation,
    check_adata,
    check_graph,
    make_h5ad,
    make_st,
    make_visium_sr3,
    make_visium_toy,
    ops_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tissuegraph.errors import ConfigError, InputError, TissueGraphError

STATS = FuzzStats()

#: Cases per suite in the default (CI) run; the slow run multiplies them by SLOW_FACTOR.
CASES = {"visium_toy": 270, "visium_sr3_mtx": 270, "her2st": 260, "h5ad": 160, "build": 40}
SLOW_FACTOR = 10


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bases(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("fuzz_bases")
    toy = make_visium_toy(data_dir, root / "visium_toy")
    return {
        "visium_toy": toy,
        "visium_sr3_mtx": make_visium_sr3(data_dir, root / "visium_sr3_mtx"),
        "her2st": make_st(data_dir, root / "her2st"),
        "h5ad": make_h5ad(toy, root / "h5ad"),
    }


@pytest.fixture(scope="module")
def cases_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_cases")


@pytest.fixture(scope="module", autouse=True)
def report(pytestconfig):
    t0 = time.perf_counter()
    yield
    STATS.seconds += time.perf_counter() - t0
    pytestconfig._tissuegraph_fuzz = STATS  # printed by tests/io/conftest.py
    out = os.environ.get("TISSUEGRAPH_FUZZ_REPORT")
    if out:
        Path(out).write_text(json.dumps(STATS.as_dict(), indent=2) + "\n")


# ----------------------------------------------------------------------------- one case
def _mutations(suite: str):
    """One or two ``(target, operation, seed)``: a file or folder of the base input, an
    operation that fits it, and the seed of the operation's own random choices."""
    one = st.sampled_from(TARGETS[suite]).flatmap(
        lambda rel: st.tuples(
            st.just(rel), st.sampled_from(ops_for(rel)), st.integers(0, 2**31 - 1)
        )
    )
    return st.lists(one, min_size=1, max_size=2)


def _prepare(suite: str, base: Path, cases_root: Path, mutations) -> tuple[Path, Path, list]:
    case = Path(tempfile.mkdtemp(dir=cases_root, prefix="case_"))
    root = case / "slide"
    shutil.copytree(base, root)
    applied = []
    for rel, op, seed in mutations:
        op = apply_mutation(root, rel, op, seed)
        applied.append(f"{op}:{rel or '.'}:{seed}")
    STATS.cases[suite] += 1
    STATS.ops.update(a.split(":")[0] for a in applied)
    return case, root, applied


#: Set to 1 to record every escape and go on (for surveying), instead of failing at the first.
KEEP_GOING = os.environ.get("TISSUEGRAPH_FUZZ_KEEP_GOING") == "1"


class _Recorded(Exception):
    """An escape recorded in KEEP_GOING mode: ends the case without failing the test."""


def _escape(suite: str, applied: list, what: str) -> None:
    STATS.escapes.append({"suite": suite, "mutations": applied, "what": what[:300]})
    if KEEP_GOING:
        raise _Recorded
    raise AssertionError(f"{suite} {applied}: {what}")


def _names_case(msg: str, root: Path) -> bool:
    return str(root) in msg or str(root.resolve()) in msg


def _run_reader(suite: str, reader, base: Path, cases_root: Path, mutations) -> None:
    case, root, applied = _prepare(suite, base, cases_root, mutations)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                result = reader(root)
            except (InputError, ConfigError) as exc:
                msg = str(exc)
                STATS.record(suite, type(exc).__name__)
                if "\n" in msg or not _names_case(msg, root):
                    _escape(suite, applied, f"{type(exc).__name__} not one line naming: {msg}")
                return
            except Exception as exc:
                STATS.record(suite, type(exc).__name__)
                _escape(suite, applied, f"{type(exc).__name__}: {exc!r}")
            try:
                check_adata(result, require_spatial=suite != "h5ad")
            except AssertionError as exc:
                STATS.record(suite, "invalid result")
                _escape(suite, applied, f"invalid AnnData accepted ({exc!r})")
            STATS.record(suite, "valid")
        for w in seen:
            if issubclass(w.category, RuntimeWarning):  # numpy arithmetic on bad values
                _escape(suite, applied, f"RuntimeWarning: {w.message}")
    finally:
        shutil.rmtree(case, ignore_errors=True)


READERS = {
    "visium_toy": lambda root: _read_visium(root),
    "visium_sr3_mtx": lambda root: _read_visium(root),
    "her2st": lambda root: _read_st(root),
    "h5ad": lambda root: _read_h5ad(root),
}


def _read_visium(root):
    from tissuegraph.io import read_visium

    return read_visium(root)


def _read_st(root):
    from tissuegraph.io import read_st

    return read_st(root / "counts.tsv.gz", root / "spots.tsv", root / "he.jpg")


def _read_h5ad(root):
    from tissuegraph.io import read_h5ad

    return read_h5ad(root / "slide.h5ad")


def _settings(n: int):
    return settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def _fuzz_reader(suite: str, n: int):
    @_settings(n)
    @given(mutations=_mutations(suite))
    def run(bases, cases_root, mutations):
        t0 = time.perf_counter()
        try:
            _run_reader(suite, READERS[suite], bases[suite], cases_root, mutations)
        except _Recorded:
            pass
        finally:
            STATS.suite_seconds[suite] += time.perf_counter() - t0

    return run


# ----------------------------------------------------------------------------- build-graphs
def _build_case(suite: str, base: Path, cases_root: Path, mutations, panel_seed: int) -> None:
    from tissuegraph.graph.config import BuildConfig, SlideSpec
    from tissuegraph.graph.pipeline import build_graphs

    case, root, applied = _prepare(f"build:{suite}", base, cases_root, mutations)
    out = case / "graphs"
    cfg = BuildConfig(out_dir=str(out))
    if suite == "her2st":
        spec = SlideSpec(
            name="s",
            format="st",
            counts=str(root / "counts.tsv.gz"),
            spots=str(root / "spots.tsv"),
            image=str(root / "he.jpg"),
        )
    else:
        spec = SlideSpec(name="s", format="visium", path=str(root))
    cfg.slides = [spec]
    cfg.patches.sizes_um = [110.0, 330.0]
    cfg.patches.crop_px = 8
    if panel_seed % 2:  # a fixed panel: the slide is read only when its graph is built
        cfg.panel.mode = "list"
        cfg.panel.genes = ["ERBB2", "KRT19", "ENSG00000131095", "MALAT1", "Gm1", "FN1"]
    else:
        cfg.panel.n_top = 30
        cfg.panel.min_spots = 1
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                build_graphs(cfg, progress=False)
            except TissueGraphError as exc:
                msg = str(exc)
                STATS.record(suite, f"build: {type(exc).__name__}")
                left = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
                if left:
                    STATS.partial_outputs += 1
                    _escape(suite, applied, f"failed build left {[p.name for p in left]}: {msg}")
                if "\n" in msg or not _names_case(msg, root):
                    _escape(suite, applied, f"build error not one line naming the input: {msg}")
                return
            except Exception as exc:
                STATS.record(suite, f"build: {type(exc).__name__}")
                _escape(suite, applied, f"build-graphs {type(exc).__name__}: {exc!r}")
            try:
                check_graph(out / "s.pt")
            except AssertionError as exc:
                STATS.record(suite, "build: invalid graph")
                _escape(suite, applied, f"invalid graph written ({exc!r})")
            STATS.record(suite, "build: valid")
        for w in seen:
            if issubclass(w.category, RuntimeWarning):
                _escape(suite, applied, f"RuntimeWarning: {w.message}")
    finally:
        shutil.rmtree(case, ignore_errors=True)


def _fuzz_build(n: int):
    @_settings(n)
    @given(
        case=st.sampled_from(["visium_toy", "her2st"]).flatmap(
            lambda suite: st.tuples(st.just(suite), _mutations(suite))
        ),
        panel_seed=st.integers(0, 1),
    )
    def run(bases, cases_root, case, panel_seed):
        suite, mutations = case
        t0 = time.perf_counter()
        try:
            _build_case(suite, bases[suite], cases_root, mutations, panel_seed)
        except _Recorded:
            pass
        finally:
            STATS.suite_seconds["build"] += time.perf_counter() - t0

    return run


# ----------------------------------------------------------------------------- the tests
test_fuzz_visium_h5 = _fuzz_reader("visium_toy", CASES["visium_toy"])
test_fuzz_visium_sr3_mtx = _fuzz_reader("visium_sr3_mtx", CASES["visium_sr3_mtx"])
test_fuzz_st = _fuzz_reader("her2st", CASES["her2st"])
test_fuzz_h5ad = _fuzz_reader("h5ad", CASES["h5ad"])
test_fuzz_build_graphs = _fuzz_build(CASES["build"])

test_fuzz_visium_h5_slow = pytest.mark.slow(
    _fuzz_reader("visium_toy", SLOW_FACTOR * CASES["visium_toy"])
)
test_fuzz_visium_sr3_mtx_slow = pytest.mark.slow(
    _fuzz_reader("visium_sr3_mtx", SLOW_FACTOR * CASES["visium_sr3_mtx"])
)
test_fuzz_st_slow = pytest.mark.slow(_fuzz_reader("her2st", SLOW_FACTOR * CASES["her2st"]))
test_fuzz_h5ad_slow = pytest.mark.slow(_fuzz_reader("h5ad", SLOW_FACTOR * CASES["h5ad"]))
test_fuzz_build_graphs_slow = pytest.mark.slow(_fuzz_build(SLOW_FACTOR * CASES["build"]))
