"""The split of ``graph.pipeline`` into ``graph.build`` / ``graph.panel`` keeps every name
importable from ``tissuegraph.graph.pipeline``."""

import importlib

import pytest

PUBLIC = [
    "build_graphs",
    "build_slide_graph",
    "select_panel",
    "as_build_config",
    "slide_config_hash",
    "merge_shards",
    "parse_shard",
    "panel_hash",
    "shard_slides",
    "shard_manifest_path",
    "validate_config",
    "graph_counts",
    "BuildPlan",
    "PANEL_MODES",
    "SHARD_GLOB",
    # private names that benchmarks and tests import from here
    "_array_rc",
    "_grid_kind",
    "_positions_um",
    "_versions",
]


@pytest.mark.parametrize("name", PUBLIC)
def test_pipeline_exports(name):
    pipeline = importlib.import_module("tissuegraph.graph.pipeline")
    assert hasattr(pipeline, name), name


def test_all_names_resolve():
    from tissuegraph.graph import pipeline

    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None


def test_same_objects_as_their_home_modules():
    from tissuegraph.graph import build, panel, pipeline

    assert pipeline.select_panel is panel.select_panel
    assert pipeline.build_slide_graph is build.build_slide_graph
    assert pipeline.as_build_config is build.as_build_config
    assert pipeline.slide_config_hash is build.slide_config_hash


def test_slide_config_hash_options_shortcut():
    """Passing precomputed options gives the same hash as deriving them from the config."""
    from tissuegraph.graph.build import as_build_config, graph_options, slide_config_hash

    cfg = as_build_config({"slides": [{"name": "a", "format": "synthetic"}]})
    spec = {"name": "a"}
    h = slide_config_hash(cfg, spec, ["G1", "G2"], ["P"], extra={"index": 0})
    assert h == slide_config_hash(
        {"slides": [{"name": "a", "format": "synthetic"}]}, spec, ["G1", "G2"], ["P"], {"index": 0}
    )
    assert h == slide_config_hash(
        None, spec, ["G1", "G2"], ["P"], {"index": 0}, options=graph_options(cfg)
    )


def test_panel_hash_value_is_stable():
    """Manifests store it and merge_shards / the trainer compare it: the value must not move."""
    from tissuegraph.graph.pipeline import panel_hash

    assert panel_hash(["G1", "G2"], ["P"]) == "8120e1d19db2add8"
