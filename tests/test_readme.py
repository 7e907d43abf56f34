"""The commands of the README and of every docs/*.md page stay runnable: every script, pipeline,
config and module they name exists, each script a command runs answers --help and knows every
flag the command passes it, the `--config` overlays load, the `--set` examples are valid config
overrides, the config tables name existing keys with their defaults, the Databricks commands
name the bundle's job, tasks, parameters, targets and variables, the Python blocks import what
exists, and the layout names every module of the package."""
import ast
import functools
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fastfill_udfs.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = {"README.md": (ROOT / "README.md").read_text()}
PAGES.update({f"docs/{p.name}": p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))})
README = PAGES["README.md"]
TEXT = "\n".join(PAGES.values())
SCRIPT = re.compile(r"(?:pipelines|bench|scripts)/[\w/]+\.(?:py|sh)")
# a shell script whose arguments go on to a Python entrypoint ("$@")
SCRIPT_RUNS = {"scripts/run_demo.sh": "pipelines/run_demo.py", "scripts/test.sh": None}


def _bash_lines(text: str) -> list[str]:
    """The command lines of a page's bash blocks, continuations joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            if line:
                lines.append(line)
    return lines


def _inline_commands(text: str) -> list[str]:
    """Commands quoted inline (`python pipelines/x.py --flag ...`, `databricks bundle run ...`)."""
    spans = re.findall(r"`((?:(?:\.venv/bin/)?python |spark-submit |bash )?"
                       r"(?:(?:pipelines|bench|scripts)/)?[\w/]+\.(?:py|sh)\s[^`]*|databricks bundle [^`]*)`",
                       text)
    return [" ".join(s.split()) for s in spans]


COMMANDS = sorted({(page, cmd) for page, text in PAGES.items()
                   for cmd in _bash_lines(text) + _inline_commands(text)})
CODE = "\n".join(cmd for _, cmd in COMMANDS)


def _script_and_flags(cmd: str) -> tuple[str, list[str]] | None:
    """The script a command runs and the flags it passes that script (not spark-submit's)."""
    tokens = shlex.split(cmd)
    for i, token in enumerate(tokens):   # a bare `name.py` is the one in bench/ or pipelines/
        if re.fullmatch(r"\w+\.py", token):
            tokens[i] = next((f"{d}/{token}" for d in ("bench", "pipelines")
                              if (ROOT / d / token).is_file()), token)
    at = next((i for i, t in enumerate(tokens) if SCRIPT.fullmatch(t)), None)
    if at is None:
        return None
    flags = [t.strip("[]").split("=")[0] for t in tokens[at + 1:] if t.strip("[]").startswith("--")]
    return tokens[at], flags


@functools.lru_cache(maxsize=None)
def _help(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def test_readme_has_the_two_commands_and_ci_calls_the_test_one():
    readme_code = "\n".join(_bash_lines(README))
    assert "bash scripts/run_demo.sh" in readme_code and "bash scripts/test.sh" in readme_code
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_readme_links_every_docs_page_and_every_link_resolves():
    for name in PAGES:
        if name.startswith("docs/") and name != "docs/study_report.md":
            assert f"]({name})" in README, f"README's Read more does not link {name}"
    for name, text in PAGES.items():
        base = (ROOT / name).parent
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[\w-]+)?\)", text):
            if not target.startswith("http"):
                assert (base / target).exists(), f"{name}: broken link or image {target}"
        for anchor in re.findall(r"\]\(\.\./README\.md#([\w-]+)\)", text):
            headings = [re.sub(r"[^\w -]", "", h).strip().lower().replace(" ", "-")
                        for h in re.findall(r"(?m)^## (.+)$", README)]
            assert anchor in headings, f"{name}: README has no section #{anchor}"


@pytest.mark.parametrize("path", sorted(set(re.findall(
    r"((?:scripts|pipelines|conf|notebooks|bench|fastfill_udfs)/[\w./-]+\.(?:sh|py|yaml))", TEXT))))
def test_named_files_exist(path):
    assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("pipeline", sorted(set(re.findall(r"pipelines/(\w+)\.py", CODE))))
def test_pipelines_answer_help(pipeline):
    proc = _help(f"pipelines/{pipeline}.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--config" in proc.stdout and "--set" in proc.stdout


@pytest.mark.parametrize("page,cmd", [c for c in COMMANDS if _script_and_flags(c[1])])
def test_command_flags_exist(page, cmd):
    """Every flag a documented command passes its script is one the script's parser offers."""
    script, flags = _script_and_flags(cmd)
    if script.endswith(".sh"):
        assert script in SCRIPT_RUNS, f"{page}: add where {script} passes its arguments"
        script = SCRIPT_RUNS[script]
        if script is None:
            assert not flags, f"{page}: {cmd}"
            return
    if not flags:
        return
    proc = _help(script)
    assert proc.returncode == 0, f"{script} --help: {proc.stderr[-2000:]}"
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", proc.stdout), \
            f"{page}: `{cmd}`: {script} has no {flag}"


@pytest.mark.parametrize("overlay", sorted(set(re.findall(r"(conf/\w+\.yaml)", TEXT))))
def test_named_config_overlays_load(overlay):
    load_config([overlay])


def test_set_examples_are_valid_overrides():
    examples = [e for e in re.findall(r"--set ([\w.]+=[^\s`]+)", TEXT) if e != "key=value"]
    assert len(examples) >= 5
    for example in examples:
        load_config([], [example])


def test_config_tables_name_keys_with_their_defaults():
    """Rows `| `key.path` | `default` | ... |` in the pages: the key exists with that default."""
    base = load_config([])
    rows = re.findall(r"(?m)^\| `([a-z_]+(?:\.[a-z_0-9]+)+)` \| `([^`]*)` \|", TEXT)
    assert rows
    for key, default in rows:
        assert str(base.get_path(key)) == default, key


def test_databricks_commands_name_the_bundle():
    bundle = yaml.safe_load((ROOT / "databricks.yml").read_text())
    jobs = {}
    for pattern in bundle["include"]:
        for path in sorted(ROOT.glob(pattern)):
            jobs.update(yaml.safe_load(path.read_text())["resources"].get("jobs", {}))
    commands = [shlex.split(c) for _, c in COMMANDS if c.startswith("databricks bundle")]
    assert any(c[2] == "run" for c in commands) and any(c[2] == "deploy" for c in commands)
    for c in commands:
        opts = dict(zip(c[3:], c[4:]))
        assert opts.get("-t", "dev") in bundle["targets"], c
        for var in [v.split("=")[0] for k, v in zip(c, c[1:]) if k == "--var"] + \
                   [t.split("=", 2)[1] for t in c if t.startswith("--var=")]:
            assert var in bundle["variables"], f"no bundle variable {var}: {c}"
        if c[2] == "run":
            job = jobs[c[3]]
            tasks = {t["task_key"] for t in job["tasks"]}
            params = {p["name"] for p in job["parameters"]}
            assert "--only" not in opts or set(opts["--only"].split(",")) <= tasks, c
            for kv in opts.get("--params", "").split(",") if "--params" in opts else []:
                assert kv.split("=")[0] in params, f"no job parameter {kv}: {c}"


def test_python_blocks_import_what_exists():
    blocks = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
    assert blocks
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module}.{alias.name}"


def test_named_package_objects_exist():
    """`fastfill_udfs.x.y` quoted in the pages is a module or an attribute of one."""
    for dotted in sorted(set(re.findall(r"`(fastfill_udfs(?:\.\w+)+)", TEXT))):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for attr in parts[cut:]:
            assert hasattr(obj, attr), dotted
            obj = getattr(obj, attr)


def test_layout_names_every_module():
    layout = PAGES["docs/layout.md"]
    named = set(re.findall(r"(\w+)\.py", layout))
    for path in sorted((ROOT / "fastfill_udfs").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if path.name == "__init__.py" or (f"`{rel.parent.as_posix()}/`" in layout
                                          and rel.parent.name != "spark"):
            continue
        assert path.stem in named, f"docs/layout.md does not name {rel}"


def test_contract_tables_match_the_code():
    from fastfill_udfs.spark.delta_io import TablePaths

    contract = PAGES["docs/data_contract.md"]
    for name in TablePaths.__dataclass_fields__:
        assert f"`{name}`" in contract or f"/{name}`" in contract, name


def test_own_gallery_example_config_is_the_readme_block():
    """conf/my_gallery.yaml is the README's "Your own gallery" config, verbatim."""
    section = README.split("## Your own gallery", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1)
    assert (ROOT / "conf" / "my_gallery.yaml").read_text() == block
    cfg = load_config(["conf/my_gallery.yaml"])
    assert cfg.get_path("data.dataset") == "gallery_table"
