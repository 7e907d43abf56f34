import pytest

from fastfill_udfs.config import ConfigError, load_config, parse_override


def test_base_config_loads_with_typed_defaults():
    cfg = load_config()
    assert cfg.get_path("backfill.batch_size") == 500
    assert cfg.get_path("spark.master") == "local[*]"


def test_overlay_then_override_applied_last(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("backfill:\n  batch_size: 10\n  policy: random\n")
    cfg = load_config([overlay], ["backfill.batch_size=20"])
    assert cfg.get_path("backfill.batch_size") == 20
    assert cfg.get_path("backfill.policy") == "random"


def test_unknown_key_in_overlay_is_named(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("backfill:\n  batch_sise: 10\n")
    with pytest.raises(ConfigError, match="backfill.batch_sise"):
        load_config([overlay])


def test_unknown_key_on_command_line_is_named():
    with pytest.raises(ConfigError, match=r"'nope'.*--set nope.x=1"):
        load_config([], ["nope.x=1"])


@pytest.mark.parametrize("override, key", [
    ("backfill.batch_size=many", "backfill.batch_size"),
    ("transformation.lr=fast", "transformation.lr"),
    ("backfill.evaluate=3", "backfill.evaluate"),
    ("demo.old_model.classes=[0, x]", r"demo.old_model.classes\[1\]"),
    ("spark=local", "spark"),
])
def test_ill_typed_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config([], [override])


def test_int_accepted_for_float_and_free_form_spark_conf():
    cfg = load_config([], ["transformation.lr=1", "spark.conf={spark.foo.bar: 3}"])
    assert cfg.get_path("transformation.lr") == 1.0
    assert isinstance(cfg.get_path("transformation.lr"), float)
    assert cfg.get_path("spark.conf")["spark.foo.bar"] == 3
    # merged, not replaced: the base file's Delta setting survives
    assert "spark.databricks.delta.snapshotPartitions" in cfg.get_path("spark.conf")


def test_missing_overlay_file_is_named():
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(["conf/nowhere.yaml"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("backfill.batch_size")


def test_every_shipped_overlay_is_valid():
    from fastfill_udfs.config import PROJECT_ROOT

    for path in sorted((PROJECT_ROOT / "conf").glob("*.yaml")):
        load_config([path])


def test_relative_paths_resolve_against_project_root():
    from fastfill_udfs.config import PROJECT_ROOT

    cfg = load_config([], ["paths.warehouse=wh", "mlflow.tracking_uri=sqlite:///x.db"])
    assert cfg.resolve_path("paths.warehouse") == str(PROJECT_ROOT / "wh")
    cfg = load_config([], ["paths.warehouse=s3://bucket/wh"])
    assert cfg.resolve_path("paths.warehouse") == "s3://bucket/wh"
