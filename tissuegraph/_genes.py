"""Case-insensitive gene-symbol matching, one home for every layer (standard library only).

Symbols are compared by ``str(symbol).upper()``; where a symbol occurs twice, the first
occurrence wins. One exception, kept so that graphs stay byte-identical across versions:
the panel lookup of the graph builder (``graph.genes.panel_matrix``) takes the *last* of
two identically spelled ``var_names`` for an exact match
(``match_positions(..., exact_wins="last")``); its case-insensitive fallback still takes the
first.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["count_ci", "dedup_ci", "match_ci", "match_positions", "upper_index", "upper_set"]


def upper_index(names: Iterable) -> dict[str, int]:
    """``SYMBOL -> position`` of the first name of each upper-cased symbol in ``names``."""
    index: dict[str, int] = {}
    for i, g in enumerate(names):
        index.setdefault(str(g).upper(), i)
    return index


def upper_set(names: Iterable) -> set[str]:
    """The upper-cased symbols of ``names``."""
    return {str(g).upper() for g in names}


def match_ci(query: Iterable, names: Iterable) -> dict[str, int]:
    """``query symbol -> position in names`` for the query symbols found (case-insensitive)."""
    index = upper_index(names)
    out = {}
    for q in query:
        j = index.get(str(q).upper())
        if j is not None:
            out[str(q)] = j
    return out


def match_positions(query: Iterable, names: Iterable, *, exact_wins: str = "first") -> list[int]:
    """Position in ``names`` of each query symbol, ``-1`` where absent: an exact-case match
    wins, else a case-insensitive one (the first such name).

    ``exact_wins``: which of two identically spelled names an exact match returns,
    ``"first"`` or ``"last"`` (see the module docstring).
    """
    if exact_wins not in ("first", "last"):
        raise ValueError(f"exact_wins must be 'first' or 'last', got {exact_wins!r}")
    names = [str(g) for g in names]
    exact: dict[str, int] = {}
    for i, g in enumerate(names):
        if exact_wins == "last":
            exact[g] = i
        else:
            exact.setdefault(g, i)
    upper = upper_index(names)
    return [exact.get(q, upper.get(q.upper(), -1)) for q in (str(t) for t in query)]


def count_ci(query: Iterable, names: Iterable) -> int:
    """How many query symbols occur in ``names`` (case-insensitive; repeats count)."""
    have = upper_set(names)
    return sum(1 for q in query if str(q).upper() in have)


def dedup_ci(genes: Iterable) -> list[str]:
    """``genes`` as strings without case-insensitive repeats (the first spelling is kept)."""
    seen: set[str] = set()
    out = []
    for g in genes:
        g = str(g)
        if g.upper() not in seen:
            seen.add(g.upper())
            out.append(g)
    return out
