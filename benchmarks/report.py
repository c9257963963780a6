"""Write the README benchmark tables from ``benchmarks/results/*.json``.

Every results file becomes one section of ``benchmarks/results/README_tables.md``: the title,
the machine, the date and the command that produced it, the summary table, and each target
next to the measured value with *met* / *missed*. When both a full run (``<name>.json``) and a
quick run (``<name>_quick.json``) exist, the full one is used. Files in the layout of
``benchmarks/_common.py`` (``table`` + ``targets``) are rendered as such; other results files
are rendered from their ``runs`` / ``results`` records (scalar fields only).

Run ``uv run python benchmarks/report.py [--results DIR] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, markdown_table  # noqa: E402

ORDER = (
    "domains_dlpfc",
    "image_to_expression_her2st",
    "niche_enrichment",
    "scale",
    "build_graphs",
    "pretrain_throughput",
    "corpus",
)
OUT_NAME = "README_tables.md"
#: parameters shown under each table (when the results file has them)
KEY_PARAMS = (
    "sections",
    "folds",
    "seeds",
    "steps",
    "n_init",
    "kind",
    "n_genes",
    "backbone",
    "n_perms",
    "repeats",
    "sizes",
    "batch_spots",
    "device",
    "elapsed_s",
)


def _load(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"skipping {path.name}: {exc}", file=sys.stderr)
        return None
    return doc if isinstance(doc, dict) else {"runs": doc}


def collect(results_dir: Path) -> dict[str, tuple[Path, dict]]:
    """``benchmark name -> (path, document)``, full runs preferred over quick runs."""
    found: dict[str, tuple[Path, dict]] = {}
    for path in sorted(results_dir.glob("*.json")):
        doc = _load(path)
        if doc is None:
            continue
        name = str(doc.get("benchmark") or path.stem.removesuffix("_quick"))
        quick = doc.get("mode") == "quick" or path.stem.endswith("_quick")
        doc.setdefault("mode", "quick" if quick else "full")
        if name in found and found[name][1].get("mode") != "quick" and quick:
            continue
        found[name] = (path, doc)
    return found


def _machine_line(m: Any) -> str:
    if not isinstance(m, dict):
        return str(m) if m else "not recorded"
    parts = [m.get("cpu")]
    cores = m.get("affinity_cores") or m.get("cpu_count")
    if cores:
        parts.append(f"{cores} cores")
    if m.get("torch_threads"):
        parts.append(f"torch threads {m['torch_threads']}")
    if m.get("memory_gb"):
        parts.append(f"{m['memory_gb']} GB RAM")
    parts.append(f"GPU {m['gpu']}" if m.get("gpu") else "no GPU")
    if m.get("load_avg_1m") is not None:
        parts.append(f"load {m['load_avg_1m']}")
    v = m.get("versions") or {}
    if v:
        parts.append(
            ", ".join(
                f"{k} {x}" for k, x in v.items() if x and k in ("tissuegraph", "torch", "squidpy")
            )
        )
    if m.get("git_commit"):
        parts.append(f"commit {m['git_commit']}")
    return "; ".join(str(p) for p in parts if p)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _target_lines(targets: list) -> list[str]:
    if not targets:
        return []
    rows = []
    for t in targets:
        if not isinstance(t, dict):
            continue
        status = t.get("met")
        status = "not measured" if status is None else ("**met**" if status else "**missed**")
        rows.append(
            [
                t.get("name", ""),
                _fmt(t.get("value")),
                f"{t.get('op', '>=')} {_fmt(t.get('target'))}{t.get('unit', '')}",
                status,
                t.get("context", ""),
            ]
        )
    return ["", markdown_table(["target", "measured", "target", "status", "context"], rows)]


def _short(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(str(x) for x in v) + "]"
    if isinstance(v, float):
        return _fmt(v)
    return str(v)


def _generic_table(doc: dict) -> str | None:
    recs = doc.get("runs") or doc.get("results")
    if isinstance(recs, dict):
        recs = [
            {"name": k, **v} if isinstance(v, dict) else {"name": k, "value": v}
            for k, v in recs.items()
        ]
    if not isinstance(recs, list) or not recs or not all(isinstance(r, dict) for r in recs):
        return None
    cols: list[str] = []
    for r in recs:
        for k, v in r.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                if k not in cols:
                    cols.append(k)
    cols = cols[:12]
    return markdown_table(cols, [[_fmt(r.get(c)) for c in cols] for r in recs])


def render_section(name: str, path: Path, doc: dict) -> str:
    title = doc.get("title") or name
    out = [f"### {title}", ""]
    mode = doc.get("mode", "full")
    out.append(
        f"*{mode} run* · machine: {_machine_line(doc.get('machine'))} · date: "
        f"{doc.get('date', 'not recorded')} · file: `benchmarks/results/{path.name}`"
    )
    out += ["", f"Command: `{doc.get('command', 'not recorded')}`"]
    params = doc.get("params") if isinstance(doc.get("params"), dict) else {}
    shown = [
        f"{k}={_short(params[k])}" for k in KEY_PARAMS if k in params and params[k] is not None
    ]
    if shown:
        out += ["", "Settings: " + ", ".join(shown)]
    out.append("")
    table = doc.get("table")
    if isinstance(table, dict) and table.get("columns"):
        out.append(markdown_table(table["columns"], table.get("rows", [])))
    else:
        gen = _generic_table(doc)
        out.append(gen if gen else "(no table in this results file)")
    out += _target_lines(doc.get("targets") or [])
    notes = doc.get("notes") or []
    if notes:
        out.append("")
        out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def render(results_dir: Path) -> str:
    found = collect(results_dir)
    names = [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)
    head = [
        "<!-- generated by `uv run python benchmarks/report.py` from benchmarks/results/*.json; "
        "do not edit by hand -->",
        "",
        "## Benchmarks",
        "",
    ]
    if not names:
        head.append("No results yet: run the scripts in `benchmarks/` (see benchmarks/README.md).")
    body = [render_section(n, *found[n]) for n in names]
    return "\n".join(head) + "\n" + "\n".join(body)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=str(RESULTS_DIR), help="folder of results JSON files")
    p.add_argument("--out", default=None, help=f"markdown file (default: <results>/{OUT_NAME})")
    p.add_argument(
        "--readme",
        nargs="?",
        const=str(Path(__file__).resolve().parents[1] / "README.md"),
        default=None,
        help="also replace the generated block between the BENCHMARKS markers of this README",
    )
    a = p.parse_args(argv)
    from tissuegraph._utils import write_text_atomic

    results = Path(a.results)
    out = Path(a.out) if a.out else results / OUT_NAME
    text = render(results)
    write_text_atomic(out, text)
    print(text)
    print(f"wrote {out}")
    if a.readme:
        update_readme(Path(a.readme), text)
        print(f"updated {a.readme}")
    return out


START, END = "<!-- BENCHMARKS:START -->", "<!-- BENCHMARKS:END -->"


def update_readme(readme: Path, text: str) -> None:
    """Replace the block between the BENCHMARKS markers of ``readme`` with ``text``."""
    from tissuegraph._utils import write_text_atomic

    src = readme.read_text()
    if START not in src or END not in src:
        raise SystemExit(f"{readme}: markers {START} / {END} not found")
    # the README has its own "## Benchmarks" heading: demote the generated one
    body = text.replace("\n## Benchmarks\n", "\n", 1)
    head, rest = src.split(START, 1)
    _, tail = rest.split(END, 1)
    write_text_atomic(readme, f"{head}{START}\n{body.strip()}\n{END}{tail}")


if __name__ == "__main__":
    main()
