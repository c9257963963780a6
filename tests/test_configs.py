"""The shipped configs load against their schemas and hold the recipes the docs describe."""

from __future__ import annotations

from pathlib import Path

import pytest

from tissuegraph.config import load_config
from tissuegraph.graph.config import BuildConfig
from tissuegraph.train.config import PretrainConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "build").glob("*.yaml")), ids=lambda p: p.name)
def test_build_configs_load(path, data_dir, monkeypatch):
    monkeypatch.setenv("TISSUEGRAPH_DATA", str(data_dir))
    cfg = load_config(BuildConfig, path)
    assert cfg.slides
    for s in cfg.slides:
        for key in ("path", "counts", "spots", "image"):
            if s[key]:
                assert Path(s[key]).exists(), f"{path.name}: {s[key]}"


@pytest.mark.parametrize(
    "path", sorted((CONFIGS / "pretrain").glob("*.yaml")), ids=lambda p: p.name
)
def test_pretrain_configs_load(path):
    cfg = load_config(PretrainConfig, path)
    assert cfg.train.max_steps >= 1


def test_domain_recipe_is_the_measured_one():
    b = load_config(BuildConfig, CONFIGS / "build" / "dlpfc.yaml")
    p = load_config(PretrainConfig, CONFIGS / "pretrain" / "dlpfc.yaml")
    assert b.normalize.scale and b.normalize.n_pcs == 50 and not b.patches.enabled
    assert p.model.conv == "gcn" and not p.model.use_genes and not p.model.residual
    assert p.model.expr_hidden_dim == 0 and not p.model.norm and p.train.min_lr_ratio == 1.0
    assert p.objectives.local_global > 0 and p.objectives.reconstruction > 0
    assert p.objectives.masked_expression == 0 and p.objectives.contrastive == 0
    assert p.train.batch_spots >= 4992  # a whole Visium capture area is one tile
