import pytest

from fastfill_udfs.config import ConfigError, choices, load_config, parse_override


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


# ----------------------------------------------------------------------------- allowed values
def _bad(value):
    return "[nope]" if isinstance(value, list) else "nope"


@pytest.mark.parametrize("key", sorted(choices()))
def test_a_value_outside_its_set_is_refused_at_load_naming_the_key(key):
    value = load_config().get_path(key)
    with pytest.raises(ConfigError, match=rf"'{key}(\[0\])?' must be one of .*'nope'"):
        load_config([], [f"{key}={_bad(value)}"])


@pytest.mark.parametrize("key", sorted(choices()))
def test_every_allowed_value_loads(key):
    is_list = isinstance(load_config().get_path(key), list)
    for allowed in choices()[key]:
        value = allowed.replace("<N>", "0")
        cfg = load_config([], [f"{key}=[{value}]" if is_list else f"{key}='{value}'"])
        assert cfg.get_path(key) == ([value] if is_list else value)


@pytest.mark.parametrize("override, key", [
    ("backfill.device=gpu", "backfill.device"),
    ("backfill.device=cuda:x", "backfill.device"),
    ("backfill.policies=[random, best]", r"backfill.policies\[1\]"),
    ("spark.log_level=LOUD", "spark.log_level"),
    ("models.preprocess.channels=2", "models.preprocess"),
    ("models.preprocess.mean=[0.1, 0.2]", "models.preprocess"),
])
def test_enumerated_and_checked_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config([], [override])
    assert load_config([], ["backfill.device=cuda:1", "spark.log_level=info"])


def test_policies_come_from_the_policies_module(monkeypatch):
    """One source: a policy added to policies.RUN_POLICIES (the policies a Spark run can rank
    by; `oracle` needs the new embeddings) is accepted by the config and offered by every
    job's --policy."""
    import ast
    from pathlib import Path

    import fastfill_udfs.policies as policies

    for refused in ("made_up", "oracle"):
        with pytest.raises(ConfigError, match="backfill.policy"):
            load_config([], [f"backfill.policy={refused}"])
    monkeypatch.setattr(policies, "RUN_POLICIES", policies.RUN_POLICIES + ("made_up",))
    assert load_config([], ["backfill.policy=made_up"]).get_path("backfill.policy") == "made_up"
    root = Path(__file__).resolve().parent.parent
    for job in ("rank_gallery", "backfill", "evaluate", "search"):
        tree = ast.parse((root / "pipelines" / f"{job}.py").read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.args
                 and isinstance(n.args[0], ast.Constant) and n.args[0].value == "--policy"]
        imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   for a in n.names}
        assert len(calls) == 1, job
        choices = {k.arg: k.value for k in calls[0].keywords}["choices"]
        assert isinstance(choices, ast.Name) and choices.id == "RUN_POLICIES", job
        assert ("fastfill_udfs.policies", "RUN_POLICIES") in imports, job


def test_unknown_key_in_an_overlay_names_the_file(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("backfill:\n  batch_size: 10\n")
    second.write_text("evaluation:\n  indexx: flat\n")
    with pytest.raises(ConfigError, match=r"evaluation\.indexx.*second\.yaml"):
        load_config([first, second])
    second.write_text("evaluation:\n  index: ivfpq\n")
    with pytest.raises(ConfigError, match="evaluation.index"):
        load_config([first, second])


def test_a_job_with_a_bad_value_exits_2_before_it_starts(capsys):
    from fastfill_udfs.cli import EXIT_CONFIG, job_parser, run_job

    started = []
    code = run_job(job_parser("a job"), lambda cfg, args: started.append(cfg),
                   ["--set", "data.dataset=parquet_files"])
    assert code == EXIT_CONFIG and not started
    assert "data.dataset" in capsys.readouterr().err
    assert run_job(job_parser("a job"), lambda cfg, args: started.append(cfg), []) == 0
    assert len(started) == 1
