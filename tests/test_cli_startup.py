"""The command line answers help, usage and config errors without importing torch or scanpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "torch_geometric", "timm", "scanpy", "anndata", "squidpy", "sklearn")


def _cli(args, cwd):
    """Run ``python -X importtime -m tissuegraph ARGS``; return (rc, message lines, modules)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tissuegraph", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    modules, lines = set(), []
    for line in res.stderr.splitlines():
        if line.startswith("import time:"):
            modules.add(line.rsplit("|", 1)[-1].strip())
        elif line.strip():
            lines.append(line)
    return res.returncode, res.stdout, lines, modules


def _heavy(modules) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


@pytest.mark.parametrize(
    "args",
    [["--help"], ["pretrain", "--help"], ["build-graphs", "--help"], ["embed", "--help"]],
)
def test_help_imports_nothing_heavy(args, tmp_path):
    rc, out, _, modules = _cli(args, tmp_path)
    assert rc == 0 and "usage: tissuegraph" in out
    assert "tissuegraph.cli" in modules  # the importtime report is read
    assert _heavy(modules) == []


def test_usage_error_imports_nothing_heavy(tmp_path):
    rc, _, lines, modules = _cli(["pretrain"], tmp_path)  # --config missing
    assert rc == 2 and "--config" in lines[-1]
    assert _heavy(modules) == []


@pytest.mark.parametrize(
    ("command", "config", "overrides", "needle"),
    [
        ("pretrain", {"trian": {"max_steps": 3}}, [], "trian"),
        ("pretrain", {"train": {"max_steps": 3}}, ["train.max_stpes=4"], "max_stpes"),
        ("pretrain", {}, ["train.threads=many"], "threads"),
        ("pretrain", {"model": {"hiden_dim": 8}}, [], "hiden_dim"),
        ("build-graphs", {"slidez": []}, [], "slidez"),
    ],
)
def test_bad_config_key_fails_before_torch(command, config, overrides, needle, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    rc, _, lines, modules = _cli([command, "--config", str(cfg), *overrides], tmp_path)
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("tissuegraph: error:") and needle in lines[0]
    assert _heavy(modules) == []
    assert not (tmp_path / "runs").exists()


def test_import_tissuegraph_and_configs_stay_light():
    code = (
        "import json, sys, tissuegraph, tissuegraph.cli, tissuegraph.config, "
        "tissuegraph.graph.config, tissuegraph.nn.config, tissuegraph.train.config; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(res.stdout) == []
