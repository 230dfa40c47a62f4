"""A non-editable install, the way users get the library: build the wheel, install it into a fresh virtual
environment, and use it from a folder outside the repository.

The fresh environment gets the dependencies (torch, transformers, ...) without the repository: a ``.pth``
file lists the dev environment's site-packages as a plain path line. Path lines do not process that
folder's own ``.pth`` files, so the dev environment's editable install of this repository stays invisible
(asserted: ``omni_attribute`` resolves into the fresh environment and ``lab``/``devtools`` do not import).

The source is copied to a temporary folder before building, so the build's ``build/`` and ``*.egg-info``
never land in the working tree. No network is used (``--no-deps``, ``--no-build-isolation``, ``--no-index``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.install

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "omni_attribute"
NOT_SHIPPED = ("lab", "devtools", "tests", "nodes", "benchmarks", "scripts", "configs", "example_workflows",
               "api_workflows", "web")
LAB_MODULES = ("world", "demo", "comfy_host", "comfy_flux", "tiny", "fixtures", "comfy_nodes")
SCRIPTS = {"omni-attribute-train": "omni_attribute.train.cli:main", "omni-attribute-run": "omni_attribute.headless:main"}
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                     ".pytest_cache", "runs", "demo-output", "node_modules", "results")


@dataclass
class Installed:
    wheel: Path
    python: Path
    bin: Path
    site: Path
    elsewhere: Path      # a working directory outside the repository

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "VIRTUAL_ENV",
                            "PYTHONUSERBASE")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.python.parent.parent)
        env["PYTHONNOUSERSITE"] = "1"
        return subprocess.run(list(args), cwd=self.elsewhere, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def python_json(self, code: str, timeout: float = 300) -> dict:
        result = self.run(str(self.python), "-c", code, timeout=timeout)
        assert result.returncode == 0, f"{code}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
        return json.loads(result.stdout.strip().splitlines()[-1])


def inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    shutil.copytree(REPO, source, ignore=COPY_IGNORE, symlinks=True)
    wheels = base / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300,
                           check=False)
    assert build.returncode == 0, f"wheel build failed:\n{build.stdout}\n{build.stderr}"
    [wheel] = wheels.glob("*.whl")

    venv = base / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300,
                             check=False)
    assert install.returncode == 0, f"wheel install failed:\n{install.stdout}\n{install.stderr}"

    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    dev_paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    # plain path lines: the dev site-packages' own .pth files (the editable finder of this repo) are not run
    (site / "_dev_dependencies.pth").write_text("".join(f"{p}\n" for p in dev_paths))
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return Installed(wheel, python, venv / "bin", site, elsewhere)


def test_wheel_holds_the_library_only(installed):
    names = zipfile.ZipFile(installed.wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {PACKAGE, *[t for t in tops if t.endswith(".dist-info")]}, \
        f"the wheel ships more than the library: {sorted(tops)}"
    for folder in NOT_SHIPPED:
        assert not [n for n in names if n.startswith(f"{folder}/")], f"the repository's {folder}/ is in the wheel"
    nested = [n for n in names if set(n.split("/")[1:-1]) & {"lab", "devtools", "tests", "nodes"}]
    assert not nested, f"laboratory/dev/test folders inside the package: {nested}"
    assert "__init__.py" not in names, "the ComfyUI entry point (repo root __init__.py) is in the wheel"

    # exactly the package's modules plus the declared package data
    patterns = pyproject().get("tool", {}).get("setuptools", {}).get("package-data", {}).get(PACKAGE, [])
    source = {p.relative_to(REPO).as_posix() for p in (REPO / PACKAGE).rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    expected = {n for n in source if n.endswith(".py")
                or any(fnmatch(n.removeprefix(f"{PACKAGE}/"), pattern) for pattern in patterns)}
    shipped = {n for n in names if n.startswith(f"{PACKAGE}/")}
    assert shipped == expected, (f"missing from the wheel: {sorted(expected - shipped)}; "
                                 f"unexpected in the wheel: {sorted(shipped - expected)}")
    for pattern in patterns:   # declared data must exist (e.g. configs/*.json)
        assert any(fnmatch(n.removeprefix(f"{PACKAGE}/"), pattern) for n in shipped), \
            f"package-data {pattern!r} matches nothing in the wheel"

    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(installed.wheel).read(entry_points).decode()
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in text, text


def test_installed_library_is_the_wheel_not_the_repository(installed):
    info = installed.python_json(
        "import importlib.util, json, sys, omni_attribute\n"
        "print(json.dumps({'file': omni_attribute.__file__, 'path': sys.path,\n"
        "  'specs': {n: getattr(importlib.util.find_spec(n), 'origin', None)\n"
        "            for n in ('lab', 'devtools', 'nodes', 'tests', 'benchmarks')}}))")
    assert inside(info["file"], installed.site), f"omni_attribute comes from {info['file']}, not the fresh venv"
    leaks = [p for p in info["path"] if p and inside(p, REPO)]
    assert not leaks, f"the repository is on the fresh interpreter's path: {leaks}"
    found = {name: origin for name, origin in info["specs"].items() if origin and inside(origin, REPO)}
    assert not found, f"repository code is importable from the installed environment: {found}"


def test_every_public_module_imports_and_none_is_lab_code(installed):
    info = installed.python_json(f"""
import importlib, json, pkgutil, sys
import {PACKAGE}
modules, errors = [], {{}}
def onerror(name):
    errors[name] = repr(sys.exc_info()[1])
for info in pkgutil.walk_packages({PACKAGE}.__path__, "{PACKAGE}.", onerror=onerror):
    if any(part.startswith("_") for part in info.name.split(".")):
        continue
    try:
        importlib.import_module(info.name)
        modules.append(info.name)
    except Exception as exc:
        errors[info.name] = f"{{type(exc).__name__}}: {{exc}}"
loaded = sorted(name for name in sys.modules
                if name.split(".")[0] in ("lab", "devtools", "nodes", "tests", "benchmarks", "folder_paths", "server")
                or name.split(".")[0].startswith("comfy"))
print(json.dumps({{"modules": modules, "errors": errors, "loaded": loaded,
                  "files": {{m: sys.modules[m].__file__ for m in modules}}}}))
""")
    assert not info["errors"], "installed modules fail to import:\n  " + "\n  ".join(
        f"{k}: {v}" for k, v in info["errors"].items())
    modules = info["modules"]
    assert {f"{PACKAGE}.encoder", f"{PACKAGE}.headless", f"{PACKAGE}.train.cli", f"{PACKAGE}.train.trainer"} <= set(modules)
    lab = [m for m in modules if set(m.split(".")[1:]) & set(LAB_MODULES)]
    assert not lab, f"laboratory/dev code ships inside the library: {lab}"
    assert not info["loaded"], f"importing the library pulled in ComfyUI or repository code: {info['loaded']}"
    outside = {m: f for m, f in info["files"].items() if not inside(f, installed.site)}
    assert not outside, f"modules not loaded from the installed wheel: {outside}"


def test_train_console_script_help(installed):
    result = installed.run(str(installed.bin / "omni-attribute-train"), "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--config", "--set", "--dry-run", "--print-config", "optim.max_steps"):
        assert option in result.stdout, result.stdout


def test_train_console_script_dry_run_outside_the_repository(installed, tiny_backbone, tiny_pairs, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({
        "output_dir": "run",
        "data": {"pairs": str(tiny_pairs), "validation_pairs": str(tiny_pairs), "image_size": 32},
        "backbone": {"path": str(tiny_backbone)},
        "adapter": {"num_tokens": 4, "connector_width": 32, "connector_layers": 2, "connector_heads": 2, "lora_r": 4,
                    "lora_alpha": 4, "min_pixels": 784, "max_pixels": 3136},
        "generator": {"kind": "tiny", "seed": 0},
        "optim": {"batch_size": 2, "max_steps": 2},
    }))
    result = installed.run(str(installed.bin / "omni-attribute-train"), "--config", str(config), "--dry-run")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "dry run: configuration, data and sizes are consistent" in result.stdout, result.stdout
    assert f"{sum(1 for line in tiny_pairs.read_text().splitlines() if line.strip())} pairs" in result.stdout
    assert not (tmp_path / "run").exists(), "a dry run wrote its output folder"

    broken = installed.run(str(installed.bin / "omni-attribute-train"), "--config", str(config), "--dry-run",
                           "--set", f"backbone.path={tmp_path / 'missing'}")
    assert broken.returncode == 2 and "missing" in broken.stderr, f"{broken.stdout}\n{broken.stderr}"


def test_run_console_script_help(installed):
    result = installed.run(str(installed.bin / "omni-attribute-run"), "--help")
    assert result.returncode == 0, result.stderr
    assert "run" in result.stdout and "ComfyUI" in result.stdout, result.stdout
    result = installed.run(str(installed.bin / "omni-attribute-run"), "run", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--server", "--set", "--out"):
        assert option in result.stdout, result.stdout
