"""The Databricks Asset Bundle (databricks.yml + resources/*.yml) as the Databricks CLI reads
it, checked against the pipeline itself so the two cannot drift:

- the job definition loads into `databricks.bundles.jobs.Job` (the typed bundle schema the
  CLI's Python support uses: an unknown field anywhere fails);
- every job of `fastfill_udfs.spark.jobs.JOBS` is run by a task's notebook (the notebook calls
  the same function as `pipelines/<job>.py`), in the pipeline's order of dependencies;
- every job parameter is a notebook widget: a config key that exists in conf/base.yaml, or a
  command-line flag of a pipelines/ script; every flag of those scripts is a parameter;
- each task's notebook declares the widgets of the parameters it reads, and the paths, the
  MLflow store and the clusters are the Databricks ones (Unity Catalog volume, `databricks`,
  a GPU runtime for the backfill)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from fastfill_udfs.config import load_config
from fastfill_udfs.notebook import CONFIG_WIDGETS, FLAG_WIDGETS, GENERAL_WIDGETS
from fastfill_udfs.spark.jobs import JOBS

ROOT = Path(__file__).resolve().parent.parent
VARIABLE = re.compile(r"\$\{var\.([a-z_]+)\}")
# command-line flags that are not parameters on Databricks (the cluster is given)
NOT_PARAMETERS = {"--help", "--master"}
FLAG_PARAMETER = {"--config": "config", "--set": "set", "--policy": "policy",
                  "--max-batches": "max_batches", "--no-evaluate": "evaluate",
                  "--force": "force", "--run-prefix": "run_name", "--filter": "filter",
                  "--stop": "stop", "--estimate-only": "estimate_only"}


def _bundle() -> dict:
    bundle = yaml.safe_load((ROOT / "databricks.yml").read_text())
    for pattern in bundle["include"]:
        for path in sorted(ROOT.glob(pattern)):
            part = yaml.safe_load(path.read_text())
            for kind, items in part["resources"].items():
                bundle.setdefault("resources", {}).setdefault(kind, {}).update(items)
    return bundle


def _resolve(value, variables: dict):
    """Substitute ${var.x} with the variables' defaults, as `bundle validate` does."""
    if isinstance(value, str):
        def sub(m):
            if m.group(1) not in variables:
                raise KeyError(f"undefined bundle variable {m.group(1)}")
            return str(variables[m.group(1)]["default"])
        return VARIABLE.sub(sub, value)
    if isinstance(value, list):
        return [_resolve(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, variables) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def bundle():
    return _bundle()


@pytest.fixture(scope="module")
def job(bundle):
    jobs = bundle["resources"]["jobs"]
    assert list(jobs) == ["fastfill_backfill"]
    return _resolve(jobs["fastfill_backfill"], bundle["variables"])


def _notebook(task: dict) -> Path:
    path = (ROOT / "resources" / task["notebook_task"]["notebook_path"]).resolve()
    assert path.is_file(), f"task {task['task_key']}: no notebook at {path}"
    return path


def _called_job_functions(path: Path) -> set[str]:
    """Names imported from fastfill_udfs.spark.jobs and called in a notebook or script."""
    tree = ast.parse(path.read_text())
    imported = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "fastfill_udfs.spark.jobs" for a in node.names}
    return {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Name) and n.func.id in imported}


def _declared_widgets(path: Path) -> set[str]:
    """The widget names a notebook declares (notebook_config's list, notebook_flag's names)."""
    tree = ast.parse(path.read_text())
    out = set(GENERAL_WIDGETS)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "notebook_config":
                assert isinstance(node.args[0], ast.List), f"{path.name}: widgets as a list"
                out |= {e.value for e in node.args[0].elts}
            elif node.func.id == "notebook_flag":
                out.add(node.args[0].value)
    return out


def _script_flags(job_name: str) -> set[str]:
    """The options of pipelines/<job>.py, read from its argparse calls."""
    tree = ast.parse((ROOT / "pipelines" / f"{job_name}.py").read_text())
    flags = {"--config", "--set", "--master"}            # cli.job_parser's own
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant)
                      and str(a.value).startswith("--")}
    return flags


def test_the_job_loads_into_the_bundle_schema(bundle, job):
    from databricks.bundles.jobs import Job   # setup.py extra "databricks" (scripts/setup.sh)

    typed = Job.from_dict(job)      # raises on any field the bundle schema does not have
    assert [t.task_key for t in typed.tasks] == [t["task_key"] for t in job["tasks"]]
    assert typed.as_dict()["max_concurrent_runs"] == 1
    assert bundle["bundle"]["name"] == "fastfill"
    assert set(bundle["targets"]) == {"dev", "prod"} and bundle["targets"]["dev"]["default"]


def test_every_pipeline_job_is_a_task_in_the_pipelines_order(job):
    tasks = {t["task_key"]: t for t in job["tasks"]}
    runs = {key: _called_job_functions(_notebook(t)) for key, t in tasks.items()}
    position = {key: i for i, key in enumerate(tasks)}
    where = {}
    for name in JOBS:
        script = ROOT / "pipelines" / f"{name}.py"
        assert script.is_file(), f"JOBS has {name} but there is no {script}"
        function = _called_job_functions(script)
        assert len(function) == 1, f"{script} calls {function}"
        found = [key for key, called in runs.items() if function <= called]
        assert found, f"no task's notebook runs {name} ({function.pop()})"
        where[name] = found[0]
    # the pipeline's order: a later job never runs in an earlier task
    order = [position[where[name]] for name in JOBS]
    assert order == sorted(order), where
    # the tasks form one chain: each depends on the one before it
    keys = list(tasks)
    assert "depends_on" not in tasks[keys[0]]
    for before, task in zip(keys, keys[1:]):
        assert [d["task_key"] for d in tasks[task]["depends_on"]] == [before], task
    # names as a Databricks user reads them: the job's own names where a task is one job
    for name in JOBS:
        if list(where.values()).count(where[name]) == 1:
            assert where[name] == name


def test_every_parameter_is_a_widget_and_every_flag_a_parameter(job):
    base = load_config([])
    params = {p["name"]: p["default"] for p in job["parameters"]}
    for name in params:
        if name in CONFIG_WIDGETS:
            base.get_path(CONFIG_WIDGETS[name])   # the key exists (KeyError otherwise)
        else:
            assert name in FLAG_WIDGETS or name in GENERAL_WIDGETS, \
                f"job parameter {name} is neither a config widget nor a flag widget"
    # the defaults are valid values of their config keys
    load_config(params["config"].split(","), [f"{CONFIG_WIDGETS[n]}={v}" for n, v in params.items()
                                              if n in CONFIG_WIDGETS])
    # every option of the pipelines' scripts the job runs is a job parameter
    scripts = list(JOBS) + ["compare"]
    for script in scripts:
        for flag in _script_flags(script) - NOT_PARAMETERS:
            assert flag in FLAG_PARAMETER, f"pipelines/{script}.py {flag}: no parameter for it"
            assert FLAG_PARAMETER[flag] in params, f"{flag} of {script}.py is not a parameter"
    for name, (_, script, flag) in FLAG_WIDGETS.items():
        assert flag in _script_flags(script), f"flag widget {name}: {script}.py has no {flag}"


def test_each_notebook_declares_the_widgets_it_is_given(job):
    params = {p["name"] for p in job["parameters"]}
    used = set()
    for task in job["tasks"]:
        declared = _declared_widgets(_notebook(task))
        unknown = declared - set(CONFIG_WIDGETS) - set(FLAG_WIDGETS) - set(GENERAL_WIDGETS)
        assert not unknown, f"{task['task_key']}: widgets {unknown} are in no table"
        used |= declared & params
    assert used == params, f"job parameters no task reads: {params - used}"
    tasks = {t["task_key"]: t for t in job["tasks"]}
    assert {"policy", "max_batches", "evaluate", "model_new"} <= _declared_widgets(
        _notebook(tasks["backfill"]))
    assert {"policy", "force", "model_h", "model_new"} <= _declared_widgets(
        _notebook(tasks["rank_gallery"]))


def test_databricks_paths_store_and_clusters(job):
    params = {p["name"]: p["default"] for p in job["parameters"]}
    assert params["warehouse"].startswith("/Volumes/") and params["warehouse"].count("/") == 5
    assert params["outputs"].startswith("/Volumes/")
    assert params["tracking_uri"] == "databricks"
    assert params["experiment"].startswith("/Users/")
    assert params["dataset"] == "gallery_table"
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}
    tasks = {t["task_key"]: t for t in job["tasks"]}
    assert tasks["backfill"]["job_cluster_key"] == "gpu"
    assert "gpu" in clusters["gpu"]["spark_version"] and "-ml-" in clusters["gpu"]["spark_version"]
    assert {t["job_cluster_key"] for k, t in tasks.items() if k != "backfill"} == {"cpu"}
    assert "gpu" not in clusters["cpu"]["spark_version"]
    for task in tasks.values():
        assert {"pypi": {"package": "faiss-cpu==1.15.1"}} in task["libraries"]
    overlay = load_config(params["config"].split(","))
    assert overlay.get_path("mlflow.tracking_uri") == "databricks"
    assert overlay.get_path("data.dataset") == "gallery_table"


def test_faiss_pin_matches_setup_py():
    """The bundle installs the faiss the project is tested with."""
    setup = (ROOT / "setup.py").read_text()
    pin = re.search(r'"(faiss-cpu==[^"]+)"', setup).group(1)
    assert pin in (ROOT / "resources" / "fastfill_job.yml").read_text()
