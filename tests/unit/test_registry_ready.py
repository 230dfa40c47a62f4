"""The package as the Comfy Registry sees it: pyproject fields, the licence, the version, what
`comfy node publish` would pack (git-tracked files minus .comfyignore) and the validator's ruff
security rules (`comfy node validate` runs ruff with S102 exec, S307 eval, E702 statements on one line)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import omni_attribute

REPO = Path(__file__).resolve().parents[2]
VALIDATOR_RULES = "S102,S307,E702"
SHIPPED = ["__init__.py", "nodes", "omni_attribute", "web", "example_workflows", "api_workflows"]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_project_fields_follow_the_registry_specification(pyproject):
    project, comfy = pyproject["project"], pyproject["tool"]["comfy"]
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name), name
    assert "comfyui" not in name.lower(), "the registry asks that node ids leave 'ComfyUI' out"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), project["version"]
    assert project["version"] == omni_attribute.__version__, "pyproject and omni_attribute.__version__ differ"
    assert f"## {project['version']}" in (REPO / "CHANGELOG.md").read_text(), "CHANGELOG.md lacks this version"
    assert project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    icon = comfy["Icon"]
    assert icon.startswith("https://") and (REPO / icon.split("/main/", 1)[1]).is_file(), icon
    assert all((REPO / folder).is_dir() for folder in comfy["includes"]) and "web" in comfy["includes"]


def test_the_licence_file_is_the_one_pyproject_names(pyproject):
    project = pyproject["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().startswith("MIT License")


def packed_files() -> list[str]:
    """What `comfy node publish` zips: git-tracked files, minus .comfyignore (folder patterns here)."""
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True)
    ignored = [line.strip() for line in (REPO / ".comfyignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert all(p.endswith("/") or "/" not in p.rstrip("/") for p in ignored), "only folder and file names here"

    def is_ignored(path: str) -> bool:
        return any(path.startswith(p) if p.endswith("/") else path == p for p in ignored)
    return [path for path in tracked.stdout.splitlines() if not is_ignored(path)]


def test_the_registry_package_holds_the_plugin_and_nothing_of_the_laboratory():
    files = packed_files()
    tops = {path.split("/", 1)[0] for path in files}
    assert set(SHIPPED) | {"LICENSE", "README.md"} <= tops
    assert not tops & {"lab", "devtools", "tests", "benchmarks", "scripts", ".ci"}, sorted(tops)


def ruff(*paths: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "-q", "--select", VALIDATOR_RULES,
                           *map(str, paths)], capture_output=True, text=True, cwd=REPO)


def test_the_validators_security_rules_pass_on_what_ships():
    result = ruff(*SHIPPED)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_the_security_check_reports_exec_and_eval(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("exec('x = 1'); eval('1')\n")
    found = ruff(bad).stdout
    assert "S102" in found and "S307" in found and "E702" in found, found
