"""Prior-knowledge readers on the real tables, and their coverage of the DLPFC panel."""

from __future__ import annotations

import numpy as np
import pytest

from tissuegraph.errors import InputError
from tissuegraph.io import (
    match_genes,
    prior_coverage,
    read_gmt,
    read_ligand_receptor,
    read_pathways,
    read_tf_targets,
    read_visium,
)


def test_collectri(priors_dir):
    df = read_tf_targets(priors_dir / "collectri_human.csv")
    assert list(df.columns) == ["source", "target", "weight"]
    assert 40_000 < len(df) <= 43_178 and df["source"].nunique() > 1000
    assert set(np.unique(df["weight"])) <= {-1.0, 1.0}
    assert not df.duplicated(["source", "target"]).any()


def test_dorothea_levels(priors_dir):
    p = priors_dir / "dorothea_human_ABC.tsv"
    abc = read_tf_targets(p)
    a = read_tf_targets(p, "dorothea", levels="A")
    assert 0 < len(a) < len(abc)
    assert list(abc.columns) == ["source", "target", "weight"]


def test_pathways_and_lr(priors_dir):
    pw = read_pathways(priors_dir / "progeny_human_top100.tsv")
    assert pw["source"].nunique() == 14 and len(pw) == 1400
    lr = read_ligand_receptor(priors_dir / "liana_consensus_human.tsv")
    assert {"ligand", "receptor"} <= set(lr.columns)
    assert not lr["receptor"].str.contains("_").any()
    cplx = lr[lr["receptor_complex"].str.contains("_")]
    assert len(cplx) > 0
    sub = cplx.iloc[0]
    assert sub["receptor"] in sub["receptor_complex"].split("_")


def test_gmt(tmp_path):
    p = tmp_path / "sets.gmt"
    p.write_text("SET_A\thttp://x\tCD3E\tCD4\n\nSET_B\tdesc\tMS4A1\n")
    df = read_gmt(p)
    assert df.values.tolist() == [
        ["SET_A", "CD3E", 1.0],
        ["SET_A", "CD4", 1.0],
        ["SET_B", "MS4A1", 1.0],
    ]
    assert len(read_pathways(p)) == 3
    bad = tmp_path / "bad.gmt"
    bad.write_text("only_a_name\n")
    with pytest.raises(InputError, match="bad.gmt"):
        read_gmt(bad)


@pytest.mark.parametrize(
    "reader,expect",
    [
        (read_tf_targets, "source,target,weight"),
        (read_pathways, "source,target,weight"),
        (read_ligand_receptor, "ligand,receptor"),
    ],
)
def test_wrong_format(tmp_path, reader, expect):
    p = tmp_path / "wrong.tsv"
    p.write_text("foo\tbar\n1\t2\n")
    with pytest.raises(InputError, match="wrong.tsv") as e:
        reader(p)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_wrong_format_option(priors_dir):
    with pytest.raises(InputError, match="collectri"):
        read_tf_targets(priors_dir / "collectri_human.csv", format="trrust")
    with pytest.raises(InputError, match="DoRothEA"):
        read_tf_targets(priors_dir / "collectri_human.csv", format="dorothea")


def test_match_genes():
    idx = match_genes(["cd3e", "CD4", "Foo", "MS4A1"], ["CD3E", "CD4", "ms4a1"])
    assert idx.tolist() == [0, 1, -1, 2]
    with pytest.raises(InputError, match="empty gene panel"):
        match_genes(["A"], [])


def test_coverage_on_dlpfc(dlpfc_dir, priors_dir):
    genes = list(read_visium(dlpfc_dir).var_names)
    rep = prior_coverage(
        genes,
        tf_targets=priors_dir / "collectri_human.csv",
        pathways=priors_dir / "progeny_human_top100.tsv",
        ligand_receptor=priors_dir / "liana_consensus_human.tsv",
    )
    assert set(rep) == {"tf_targets", "pathways", "ligand_receptor"}
    for r in rep.values():
        assert 0 < r["edges_kept"] < r["edges_total"]
        assert 0 < r["panel_genes_covered"] <= len(genes)
        assert r["panel_fraction"] == pytest.approx(r["panel_genes_covered"] / len(genes), abs=1e-4)
    assert rep["pathways"]["sources_kept"] >= 10
    assert rep["tf_targets"]["edges_kept"] > 500
    with pytest.raises(InputError, match="empty gene panel"):
        prior_coverage([], tf_targets=priors_dir / "collectri_human.csv")
