"""Tests of the named real datasets (read from $TISSUEGRAPH_DATA via the conftest fixture)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tissuegraph import datasets
from tissuegraph.errors import InputError


@pytest.fixture(autouse=True)
def _data_env(monkeypatch, data_dir):
    monkeypatch.setenv("TISSUEGRAPH_DATA", str(data_dir))


def test_data_dir_and_priors(data_dir):
    assert datasets.data_dir() == data_dir.resolve()
    pri = datasets.priors_dir()
    assert (pri / "collectri_human.csv").is_file()


def test_data_dir_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("TISSUEGRAPH_DATA")
    with pytest.raises(InputError, match="TISSUEGRAPH_DATA"):
        datasets.data_dir()
    monkeypatch.setenv("TISSUEGRAPH_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="not a folder"):
        datasets.data_dir()
    monkeypatch.setenv("TISSUEGRAPH_DATA", str(tmp_path))
    with pytest.raises(InputError, match="DLPFC sample 151673 not found"):
        datasets.dlpfc_labels("151673")


def test_unknown_names():
    with pytest.raises(InputError, match="151673"):
        datasets.dlpfc("999999")
    with pytest.raises(InputError, match="C2"):
        datasets.her2st_proportions("Z9")
    assert datasets.DLPFC_SAMPLES == ("151673", "151674")
    assert "C2" in datasets.HER2ST_SECTIONS


def test_dlpfc_labels():
    lab = datasets.dlpfc_labels("151673")
    assert isinstance(lab, pd.Series) and lab.name == "layer"
    assert len(lab) == 3611 and lab.index.is_unique
    assert list(lab.cat.categories) == ["L1", "L2", "L3", "L4", "L5", "L6", "WM"]
    assert lab.index[0].endswith("-1")


def test_dlpfc_reader_and_labels_align():
    adata = datasets.dlpfc("151673")
    assert adata.n_obs == 3639
    assert adata.uns["tissuegraph"]["platform"] == "visium"
    assert adata.uns["tissuegraph"]["grid"] == "hex"
    lab = datasets.dlpfc_labels("151673")
    assert lab.index.isin(adata.obs_names).mean() > 0.99
    assert "151673" in adata.uns["spatial"]


def test_her2st_proportions():
    p = datasets.her2st_proportions("C2")
    assert p.shape[1] == 8 and "Epithelial" in p.columns
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-3)
    assert p.index.str.fullmatch(r"\d+x\d+").all()


def test_her2st_reader_and_proportions_align():
    adata = datasets.her2st("C2")
    assert adata.uns["tissuegraph"]["platform"] == "st"
    p = datasets.her2st_proportions("C2")
    assert p.index.isin(adata.obs_names).mean() > 0.95
    assert adata.n_obs > 100
