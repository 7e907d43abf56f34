"""The README's commands stay runnable: every script, pipeline and config it names exists, each
pipeline answers --help, and its `--set` examples are valid config overrides."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastfill_udfs.config import load_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CODE = "\n".join(re.findall(r"```bash\n(.*?)```", README, flags=re.S))


def test_readme_has_the_two_commands_and_ci_calls_the_test_one():
    assert "bash scripts/run_demo.sh" in CODE and "bash scripts/test.sh" in CODE
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("path", sorted(set(re.findall(r"((?:scripts|pipelines|conf|notebooks)/[\w./-]+\.(?:sh|py|yaml))", README))))
def test_named_files_exist(path):
    assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("pipeline", sorted(set(re.findall(r"pipelines/(\w+)\.py", CODE))))
def test_pipelines_answer_help(pipeline):
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / f"{pipeline}.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--config" in proc.stdout and "--set" in proc.stdout


def test_set_examples_are_valid_overrides():
    examples = [e for e in re.findall(r"--set ([\w.]+=[^\s`]+)", README + (ROOT / "docs" / "jobs.md").read_text())
                if e != "key=value"]
    assert examples
    for example in examples:
        load_config([], [example])


def test_contract_tables_match_the_code():
    from fastfill_udfs.spark.delta_io import TablePaths

    contract = (ROOT / "docs" / "data_contract.md").read_text()
    for name in TablePaths.__dataclass_fields__:
        assert f"`{name}`" in contract or f"/{name}`" in contract, name


def test_own_gallery_example_config_is_the_readme_block():
    """conf/my_gallery.yaml is the README's "Your own gallery" config, verbatim."""
    section = README.split("## Your own gallery", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1)
    assert (ROOT / "conf" / "my_gallery.yaml").read_text() == block
    cfg = load_config(["conf/my_gallery.yaml"])
    assert cfg.get_path("data.dataset") == "gallery_table"
