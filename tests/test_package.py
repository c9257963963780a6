"""The package surface: ``import tissuegraph as tg`` with lazy submodules, and its logger."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

LAZY = """
import sys
import tissuegraph as tg
assert not {"tissuegraph.tl", "tissuegraph.pl", "tissuegraph.io"} & set(sys.modules)
tg.tl, tg.pl, tg.io, tg.datasets
assert "torch" not in sys.modules, "importing tl/pl/io/datasets imported torch"
a = tg.datasets.simulate_slide(200, n_niches=3, seed=0, image=False)
tg.tl.spatial_neighbors(a)
tg.tl.aggregate_neighbors(a, n_hops=1, n_pcs=10)
tg.tl.niches(a, n_niches=3, use_rep="X_aggregated", n_init=2, refine=4)
tg.tl.nhood_enrichment(a, cluster_key="tg_niche")
assert "torch" not in sys.modules, "a model-free analysis imported torch"
print("ok")
"""


def test_submodules_are_lazy_and_torch_free():
    res = subprocess.run(
        [sys.executable, "-c", LAZY], capture_output=True, text=True, timeout=300, check=False
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")


def test_attribute_access():
    import tissuegraph as tg

    assert tg.tl.niches is not None and tg.pl.niches is not None and tg.io.read_visium
    assert {"io", "tl", "pl", "datasets"} <= set(dir(tg))
    assert tg.__version__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tg.nope  # noqa: B018


@pytest.fixture
def tg_logger():
    from tissuegraph._logging import logger

    level = logger.level
    yield logger
    logger.setLevel(level)


def test_logger_writes_to_stderr_by_default(tg_logger, capsys):
    from tissuegraph.demo import _Stages

    assert tg_logger.name == "tissuegraph" and tg_logger.getEffectiveLevel() <= logging.INFO
    _Stages(progress=True).start("build", "building graphs")
    logging.getLogger("tissuegraph.graph.pipeline").warning("child message")
    err = capsys.readouterr().err
    assert "[demo" in err and "building graphs" in err and "child message" in err
    _Stages(progress=False).start("build", "silent")
    assert "silent" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["inspect", "nowhere"], logging.INFO),
        (["--quiet", "inspect", "nowhere"], logging.WARNING),
        (["inspect", "nowhere", "-q"], logging.WARNING),
        (["-v", "inspect", "nowhere"], logging.DEBUG),
        (["inspect", "--verbose", "nowhere"], logging.DEBUG),
    ],
)
def test_cli_verbosity(tg_logger, argv, level, capsys):
    from tissuegraph.cli import build_parser, main

    args = build_parser().parse_args(argv)
    assert getattr(args, "quiet", False) == (level == logging.WARNING)
    main(argv)  # the path does not exist: an error, after the level was set
    assert tg_logger.level == level
    assert "nowhere" in capsys.readouterr().err
