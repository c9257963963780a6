"""Prints the fuzz figures (tests/io/test_fuzz.py) at the end of the session."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    stats = getattr(config, "_tissuegraph_fuzz", None)
    if stats is None or not sum(stats.cases.values()):
        return
    d = stats.as_dict()
    tr = terminalreporter
    tr.section("tissuegraph fuzz")
    tr.write_line(f"cases tried: {d['cases']} ({d['cases_by_suite']}) in {d['seconds']} s")
    tr.write_line("outcomes: " + ", ".join(f"{k} {v}" for k, v in d["outcomes"].items()))
    tr.write_line(f"exception types seen: {', '.join(d['exception_types']) or 'none'}")
    tr.write_line(f"escapes: {d['escapes']}; partial outputs: {d['partial_outputs']}")
    for e in d["escape_examples"]:
        tr.write_line(f"  escape: {e}")
