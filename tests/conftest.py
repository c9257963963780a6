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


@pytest.fixture
def torchrun_two():
    """Run ``script`` under ``torch.distributed.run`` with 2 local CPU ranks (1 thread each);
    with ``out_dir``, returns the state dicts the script saved as ``out_dir/rank0.pt`` and
    ``out_dir/rank1.pt``."""
    import socket
    import subprocess
    import sys

    import torch

    def run(script: Path, out_dir: Path | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(port), str(script)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stderr[-3000:]
        if out_dir is None:
            return None
        return tuple(torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    return run
