"""The quick demo runs end to end and finds the simulated niches."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tissuegraph import io
from tissuegraph.demo import demo_ari, run_demo

# The quick demo slide (1,000 spots, 5 niches, difficulty 0.5) is built so that expression
# alone separates the niches only partly: cell-type mixtures overlap, one niche is a
# "twin" of another that differs only in pathway activity and image texture, and borders
# are blurred. A model-free baseline (PCA + first-ring mean + GMM) scores ARI ~0.68 on it
# and chance is 0. The quick demo (300 steps) reaches ~0.55; the full demo (2,000 spots, 400
# steps) reaches the baseline. The test asks for clearly non-random, spatially coherent
# niches, well above chance.
MIN_ARI = 0.45


def test_quick_demo(tmp_path):
    out = tmp_path / "demo"
    report = run_demo(out, quick=True, progress=False, seed=0)
    ari = demo_ari(report)
    print(report)
    assert ari >= MIN_ARI
    assert "baseline ARI" in report
    assert (out / "report.txt").read_text() == report
    for name in ("niches.png", "training_curves.png", "nhood_enrichment.png"):
        img = np.asarray(Image.open(out / name).convert("RGB"))
        assert img.shape[0] > 200 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    a = io.read_h5ad(out / "demo.h5ad")
    assert a.obsm["X_tissuegraph"].shape[0] == a.n_obs == 1000
    assert a.obs["tg_niche"].nunique() == 5
    assert "tg_niche_nhood_enrichment" in a.uns
