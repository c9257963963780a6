"""Shared fixtures. Real-data tests read $TISSUEGRAPH_DATA (../shared/data in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


def _data_dir() -> Path:
    env = os.environ.get("TISSUEGRAPH_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    for c in candidates:
        if (c / "dlpfc").is_dir():
            return c
    pytest.fail(
        "real data not found: set TISSUEGRAPH_DATA to the folder holding dlpfc/, her2st/, "
        "priors/ and visium_toy/ (see the README, 'Real data')",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _data_dir()


@pytest.fixture(scope="session")
def dlpfc_dir(data_dir) -> Path:
    return data_dir / "dlpfc" / "151673"


@pytest.fixture(scope="session")
def her2st_dir(data_dir) -> Path:
    return data_dir / "her2st"


@pytest.fixture(scope="session")
def priors_dir(data_dir) -> Path:
    return data_dir / "priors"
