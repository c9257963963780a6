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


def test_exact_last_wins_where_the_panel_lookup_kept_it():
    import numpy as np
    import scipy.sparse as sp

    from tissuegraph.graph.genes import panel_matrix

    names = ["Abc", "Abc", "ABC", "xyz", "XYZ"]
    assert match_positions(["Abc", "abc", "Xyz"], names) == [0, 0, 3]
    assert match_positions(["Abc", "abc", "Xyz"], names, exact_wins="last") == [1, 0, 3]
    x = sp.csr_matrix(np.arange(10, dtype=np.float32).reshape(2, 5))
    m, missing = panel_matrix(x, names, ["Abc", "xyz", "nope"])
    assert missing == ["nope"]
    np.testing.assert_array_equal(m.toarray(), [[1, 3, 0], [6, 8, 0]])
