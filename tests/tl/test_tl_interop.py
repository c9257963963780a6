"""Interop: tissuegraph's results against squidpy's and decoupler's on the same real slide.

These need the ``bench`` dependency group and are deselected by default:
``uv run --group bench pytest -m interop`` (``.ci/run`` runs them after the main suite).
A missing package fails the test instead of skipping it.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tissuegraph import io, tl

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def dlpfc(dlpfc_dir):
    return io.read_visium(dlpfc_dir, library_id="151673")


def _squidpy():
    try:
        import squidpy as sq
    except ImportError:  # pragma: no cover - depends on the environment
        pytest.fail(
            "squidpy is not installed: interop tests run with `uv run --group bench pytest "
            "-m interop`",
            pytrace=False,
        )
    return sq


def test_spatial_neighbors_equals_squidpy_grid(dlpfc):
    sq = _squidpy()
    a = dlpfc.copy()
    tl.spatial_neighbors(a, key_added="tg")
    sq.gr.spatial_neighbors(a, coord_type="grid", n_neighs=6)
    ours, theirs = a.obsp["tg_connectivities"], a.obsp["spatial_connectivities"]
    assert ours.shape == theirs.shape
    assert ((ours > 0) != (theirs > 0)).nnz == 0
    assert ours.nnz > 6 * a.n_obs * 0.9  # nearly every spot has its 6 neighbours
    # and squidpy's statistics run on our keys unchanged
    a.obs["cluster"] = (a.obs["array_row"] // 20).astype(str).astype("category")
    sq.gr.nhood_enrichment(
        a, cluster_key="cluster", connectivity_key="tg", n_perms=20, show_progress_bar=False
    )
    assert np.isfinite(a.uns["cluster_nhood_enrichment"]["zscore"]).any()


@pytest.mark.parametrize("method", ["ulm", "wmean"])
def test_pathway_activity_equals_decoupler(dlpfc, priors_dir, method):
    if sys.version_info < (3, 11):  # pragma: no cover
        pytest.skip("decoupler >= 2 needs Python >= 3.11")
    try:
        import decoupler  # noqa: F401
    except ImportError:  # pragma: no cover
        pytest.fail("decoupler is not installed: run with `uv run --group bench`", pytrace=False)
    a = dlpfc.copy()
    pw = io.read_pathways(priors_dir / "progeny_human_top100.tsv")
    tl.pathway_activity(a, pw, method=method, key_added="ours")
    tl.pathway_activity(a, pw, method=method, backend="decoupler", key_added="dc")
    ours, dc = a.obsm["ours"], a.obsm["dc"]
    assert list(ours.columns) == list(dc.columns) and ours.shape[1] >= 10
    np.testing.assert_allclose(dc.to_numpy(), ours.to_numpy(), rtol=1e-4, atol=1e-5)
    assert a.uns["dc"]["params"]["backend"] == "decoupler"
