"""The shared case-insensitive gene-symbol helpers (tissuegraph._genes)."""

from tissuegraph._genes import count_ci, dedup_ci, match_ci, match_positions, upper_index


def test_first_occurrence_wins():
    names = ["Abc", "ABC", "xyz"]
    assert upper_index(names) == {"ABC": 0, "XYZ": 2}
    assert match_ci(["abc", "XYZ", "nope"], names) == {"abc": 0, "XYZ": 2}


def test_exact_case_wins_in_positions():
    names = ["Abc", "ABC", "xyz"]
    assert match_positions(["ABC", "abc", "Xyz", "none"], names) == [1, 0, 2, -1]


def test_count_and_dedup():
    assert count_ci(["a", "A", "b"], ["A"]) == 2
    assert dedup_ci(["Gad1", "GAD1", 3, "x"]) == ["Gad1", "3", "x"]


def test_routed_callers_agree():
    from tissuegraph.io.priors import match_genes
    from tissuegraph.tl._core import match_genes_ci

    names = ["Abc", "ABC", "xyz"]
    assert match_genes(["ABC", "q"], names).tolist() == [1, -1]
    assert match_genes_ci(["ABC", "q"], names) == {"ABC": 0}
