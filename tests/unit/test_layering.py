"""The repository's layering, checked statically (files are parsed with ``ast``; nothing is imported).

    omni_attribute/   the library: torch & co., never ComfyUI, never the repository around it
    nodes/            the ComfyUI adapter: imports the library absolutely (``omni_attribute...``)
    __init__.py       the ComfyUI entry point
    lab/, devtools/   laboratory and dev tooling: may import the library, are imported by nothing shipped
    tests/, benchmarks/

Every checker takes the repository root, so the tests at the bottom run each one on a tiny fake tree
that holds a violation (proving the check can fail) as well as on the real tree (which must pass).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

LIBRARY = "omni_attribute"
ADAPTER = "nodes"
# ComfyUI's own top-level modules (anything starting with "comfy" counts as well: comfy, comfy_api,
# comfy_execution, comfy_extras, comfy_config, comfyui_version, comfyui_frontend_package, ...).
COMFY_MODULES = {"folder_paths", "server", "execution", "nodes", "node_helpers", "latent_preview", "main",
                 "cuda_malloc", "app", "protocol", "utils", "new_updater", "hook_breaker_ac10a0"}
REPO_ONLY = {"lab", "devtools", "tests", "benchmarks", "scripts"}
# folders of the repository that do not exist next to an installed package
REPO_FOLDERS = {"configs", "example_workflows", "api_workflows", "lab", "devtools", "tests", "benchmarks", "scripts",
                "web", "runs", "nodes", "demo-output"}


# ---- parsing ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Import:
    path: Path            # the file
    line: int
    target: str           # absolute dotted name ("" parts resolved); relative imports resolved against the repo root
    text: str             # the statement as written
    module_level: bool    # executed when the module is imported (not inside a function / TYPE_CHECKING)
    relative: bool
    escapes: bool         # a relative import that climbs above the repository root's package structure
    names: tuple[str, ...] = ()   # "from target import names": the names (their submodule records follow)

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}: {self.text}"


def python_files(root: Path, folder: str) -> list[Path]:
    base = root / folder
    if base.is_file():
        return [base]
    return sorted(p for p in base.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(root: Path, path: Path) -> str:
    """Dotted name of a file, taking the repository root as the (nameless) top package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(root: Path, path: Path, module: str | None, level: int) -> tuple[str, bool]:
    if level == 0:
        return module or "", False
    package = module_name(root, path).split(".") if module_name(root, path) else []
    if not is_package(path):
        package = package[:-1]
    escapes = level - 1 > len(package)
    base = package[:len(package) - (level - 1)] if level - 1 <= len(package) else []
    return ".".join([*base, *([module] if module else [])]), escapes


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _dynamic_import(node: ast.Call) -> str | None:
    """``importlib.import_module("x")`` / ``import_module("x")`` / ``__import__("x")`` with a literal name."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str) and not node.args[0].value.startswith("."):
        return node.args[0].value
    return None


def imports(root: Path, path: Path) -> list[Import]:
    """Every import in a file (module level and inside functions), relative ones resolved."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    lines = source.splitlines()
    found: list[Import] = []

    def text(node: ast.AST) -> str:
        return lines[node.lineno - 1].strip()

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(path, node.lineno, alias.name, text(node), module_level, False, False))
        elif isinstance(node, ast.ImportFrom):
            base, escapes = _resolve(root, path, node.module, node.level)
            # "from pkg import name": name may be a submodule; record both, the graph keeps what exists
            found.append(Import(path, node.lineno, base, text(node), module_level, node.level > 0, escapes,
                                tuple(alias.name for alias in node.names)))
            for alias in node.names:
                if alias.name != "*":
                    found.append(Import(path, node.lineno, f"{base}.{alias.name}" if base else alias.name,
                                        text(node), module_level, node.level > 0, escapes))
        elif isinstance(node, ast.Call) and (name := _dynamic_import(node)):
            found.append(Import(path, node.lineno, name, text(node), module_level, False, False))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            module_level = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, module_level)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, module_level)

    visit(tree, True)
    return found


def top(name: str) -> str:
    return name.split(".", 1)[0]


def is_comfy(name: str) -> bool:
    return top(name).startswith("comfy") or top(name) in COMFY_MODULES


# ---- (a) the library imports no ComfyUI and nothing of the repository around it -----------------------

def library_import_violations(root: Path) -> list[str]:
    problems = []
    for path in python_files(root, LIBRARY):
        for imp in imports(root, path):
            if imp.relative and (imp.escapes or top(imp.target) != LIBRARY):
                problems.append(f"{imp.where(root)}  (relative import leaves the {LIBRARY} package: {imp.target or '<repo root>'})")
            elif is_comfy(imp.target):
                problems.append(f"{imp.where(root)}  (the library must not import ComfyUI: {imp.target})")
            elif top(imp.target) in REPO_ONLY:
                problems.append(f"{imp.where(root)}  (the library must not import repository code: {imp.target})")
    return sorted(set(problems))


# ---- (b) the adapter reaches the library absolutely and imports no lab/devtools/tests ---------------------

def adapter_import_violations(root: Path) -> list[str]:
    problems = []
    for path in python_files(root, ADAPTER):
        for imp in imports(root, path):
            if imp.escapes:
                problems.append(f"{imp.where(root)}  (relative import climbs above the repository)")
            elif imp.relative and top(imp.target) == LIBRARY:
                problems.append(f"{imp.where(root)}  (reaches the library relatively: import it absolutely, "
                                f"as '{LIBRARY}...')")
            elif not imp.relative and f".{LIBRARY}" in f".{imp.target}" and top(imp.target) != LIBRARY:
                problems.append(f"{imp.where(root)}  (reaches the library under another name: {imp.target})")
            elif top(imp.target) in REPO_ONLY:
                problems.append(f"{imp.where(root)}  (the ComfyUI adapter must not import {top(imp.target)}/)")
    return sorted(set(problems))


# ---- (c) no import cycle among the library's modules at module level ------------------------------------

def library_modules(root: Path) -> dict[str, Path]:
    return {module_name(root, p): p for p in python_files(root, LIBRARY)}


def import_graph(root: Path) -> dict[str, dict[str, Import]]:
    """module -> {imported library module -> the import}, module-level imports only."""
    modules = library_modules(root)
    graph: dict[str, dict[str, Import]] = {name: {} for name in modules}
    for name, path in modules.items():
        for imp in imports(root, path):
            if imp.names and all(f"{imp.target}.{n}" in modules for n in imp.names):
                continue   # "from pkg import submodule": the edge is to the submodule (recorded separately)
            if imp.module_level and imp.target in modules and imp.target != name:
                graph[name].setdefault(imp.target, imp)
            elif imp.module_level and imp.target == name and not is_package(path):
                graph[name].setdefault(name, imp)
    return graph


def import_cycles(root: Path) -> list[str]:
    """One message per strongly connected component with a cycle, naming the cycle's path with file:line."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan (the graph is small: recursion is fine)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    messages = []
    for component in components:
        members = set(component)
        start = min(component)
        if len(component) == 1 and start not in graph[start]:
            continue
        # shortest path start -> ... -> start inside the component
        previous: dict[str, str] = {}
        frontier, seen, end = [start], set(), None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        previous.setdefault(f"{start}#end", v)
                        end = v
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        previous[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [start]
        v = end
        while v != start:
            path.append(v)
            v = previous[v]
        path = [start, *reversed(path[1:])]
        steps = [f"{a} imports {b} at {graph[a][b].where(root)}" for a, b in zip(path, [*path[1:], start])]
        messages.append("import cycle " + " -> ".join([*path, start]) + ":\n    " + "\n    ".join(steps))
    return messages


# ---- (d) shipped library files do not read repository folders at run time ------------------------------

def _file_ascent(node: ast.AST, names: dict[str, int] | None = None) -> int | None:
    """How many folders up from the file an expression rooted at ``__file__`` points (1 = the file's folder).
    ``names``: variables already known to hold such a path (``HERE = Path(__file__).parent``)."""
    names = names or {}
    if isinstance(node, ast.Name):
        return 0 if node.id == "__file__" else names.get(node.id)
    if isinstance(node, ast.Attribute) and node.attr == "parent":
        inner = _file_ascent(node.value, names)
        return None if inner is None else inner + 1
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
        inner = _file_ascent(node.value.value, names)
        k = node.slice
        if inner is not None and isinstance(k, ast.Constant) and isinstance(k.value, int):
            return inner + k.value + 1
        return None
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in ("resolve", "absolute", "expanduser") and isinstance(func, ast.Attribute) and not node.args:
            return _file_ascent(func.value, names)
        if name in ("Path", "PurePath", "abspath", "realpath", "normpath", "fspath", "str") and len(node.args) == 1:
            return _file_ascent(node.args[0], names)
        if name == "dirname" and len(node.args) == 1:
            inner = _file_ascent(node.args[0], names)
            return None if inner is None else inner + 1
    return None


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _names_repo_folder(value: str) -> bool:
    first = re.split(r"[/\\]", value.strip("./\\"), maxsplit=1)[0]
    return first in REPO_FOLDERS


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def repository_read_violations(root: Path) -> list[str]:
    """A path computed from ``__file__`` that climbs out of the package folder; a ``REPO``-like variable or a
    ``.parents[...]`` of unknown depth together with a repository folder name; a relative path into a
    repository folder opened as such."""
    problems = []
    for path in python_files(root, LIBRARY):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        lines = source.splitlines()
        rel = path.relative_to(root)
        depth = len(rel.parts)  # omni_attribute/x.py: 2; an ascent >= depth leaves the package folder
        docstrings = _docstrings(tree)

        def where(node: ast.AST, rel: Path = rel, lines: list[str] = lines) -> str:
            return f"{rel}:{node.lineno}: {lines[node.lineno - 1].strip()}"

        names: dict[str, int] = {}   # variables holding a __file__-rooted path (assignment order)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                ascent = _file_ascent(node.value, names)
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if ascent is not None and isinstance(target, ast.Name):
                        names[target.id] = ascent

        climbs: dict[int, tuple[int, ast.AST]] = {}   # line -> (largest ascent, node)
        repo_hints, folder_strings = [], []
        for node in ast.walk(tree):
            ascent = _file_ascent(node, names)
            if ascent is not None and ascent >= depth and ascent > climbs.get(node.lineno, (-1, None))[0]:
                climbs[node.lineno] = (ascent, node)
            if isinstance(node, ast.Name) and re.fullmatch(r"_?REPO(SITORY)?(_ROOT|_DIR)?", node.id):
                repo_hints.append(node)
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "parents" and ascent is None:
                repo_hints.append(node)   # parents[...] of something not known to be the file's path
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                    and len(node.value) < 200 and _names_repo_folder(node.value):
                folder_strings.append(node)
        for ascent, node in climbs.values():
            problems.append(f"{where(node)}  (a path {ascent} folder(s) up from the file leaves the installed "
                            f"package: the repository is not there after 'pip install')")
        if climbs or repo_hints:
            for node in folder_strings:
                problems.append(f"{where(node)}  (reads the repository folder {node.value!r}: it does not ship)")
            if folder_strings:
                for node in repo_hints:
                    problems.append(f"{where(node)}  (the library has no repository root at run time)")
        for node in ast.walk(tree):   # a relative path into a repository folder (depends on the working directory)
            if isinstance(node, ast.Call) and _call_name(node) in ("Path", "PurePath", "open", "join", "glob",
                                                                   "load_config", "exists", "isfile", "isdir"):
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and "/" in arg.value \
                            and _names_repo_folder(arg.value):
                        problems.append(f"{where(arg)}  (relative path into the repository folder "
                                        f"{arg.value!r}: it does not ship)")
    return sorted(set(problems))


# ---- (e) nothing shipped imports lab/ or devtools/ -------------------------------------------------------

def shipped_files(root: Path) -> list[Path]:
    files = python_files(root, LIBRARY) + python_files(root, ADAPTER)
    if (root / "__init__.py").is_file():
        files.append(root / "__init__.py")
    return files


def shipped_imports_of_repo_code(root: Path) -> list[str]:
    problems = []
    for path in shipped_files(root):
        for imp in imports(root, path):
            if top(imp.target) in {"lab", "devtools"}:
                problems.append(f"{imp.where(root)}  (shipped code imports {top(imp.target)}/, which does not ship)")
    return sorted(set(problems))


# ---- the checks on the real tree ------------------------------------------------------------------------

def _report(title: str, problems: list[str]) -> str:
    return f"{title} ({len(problems)}):\n  " + "\n  ".join(problems)


def test_real_tree_is_scanned():
    """Guard against a vacuous pass (a wrong root finds no files)."""
    assert len(library_modules(REPO)) >= 10, sorted(library_modules(REPO))
    assert len(python_files(REPO, ADAPTER)) >= 3
    assert any(imp.target.startswith(f"{LIBRARY}.") for p in python_files(REPO, ADAPTER) for imp in imports(REPO, p))
    assert sum(len(edges) for edges in import_graph(REPO).values()) >= 10


def test_library_imports_no_comfyui_or_repository_code():
    problems = library_import_violations(REPO)
    assert not problems, _report("omni_attribute/ imports ComfyUI or repository-only code", problems)


def test_adapter_imports_library_absolutely_and_no_lab():
    problems = adapter_import_violations(REPO)
    assert not problems, _report("nodes/ breaks the layering", problems)


def test_library_has_no_import_cycle():
    problems = import_cycles(REPO)
    assert not problems, _report("module-level import cycles in omni_attribute/", problems)


def test_library_reads_no_repository_folder():
    problems = repository_read_violations(REPO)
    assert not problems, _report("omni_attribute/ reads repository folders at run time", problems)


def test_nothing_shipped_imports_lab_or_devtools():
    problems = shipped_imports_of_repo_code(REPO)
    assert not problems, _report("shipped code imports lab/ or devtools/", problems)


# ---- the checks can fail: tiny fake trees ----------------------------------------------------------------

def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


CLEAN = {
    "__init__.py": "import importlib.util\nif importlib.util.find_spec('comfy_api'):\n    from .nodes import comfy_entrypoint\n",
    "nodes/__init__.py": "import folder_paths\nfrom comfy_api.latest import io\nfrom omni_attribute.encoder import encode\nfrom . import sockets\n",
    "nodes/sockets.py": "from comfy_api.latest import io\n",
    "omni_attribute/__init__.py": '"""Library; see configs/x.yaml and api_workflows/y.api.json in the repository."""\n',
    "omni_attribute/errors.py": "class Error(Exception):\n    pass\n",
    "omni_attribute/encoder.py": (
        "from __future__ import annotations\nfrom pathlib import Path\nfrom typing import TYPE_CHECKING\n"
        "from .errors import Error\nfrom . import prompt\n"
        "if TYPE_CHECKING:\n    from .train.config import TrainConfig\n"
        "CONFIGS = Path(__file__).resolve().parent / 'configs'\n"
        "def encode():\n    import torch\n    return torch\n"),
    "omni_attribute/prompt.py": "from .errors import Error\n",
    "omni_attribute/train/__init__.py": "",
    "omni_attribute/train/config.py": (
        "from ..encoder import encode\nfrom .. import errors\nfrom pathlib import Path\n"
        "HERE = Path(__file__).parents[1] / 'configs'\n"
        "def help():\n    return 'paths are relative to the config file, e.g. configs/train.yaml'\n"),
    "lab/__init__.py": "import omni_attribute\nimport devtools\n",
    "lab/comfy_nodes/__init__.py": "import comfy.model_management\n",
    "devtools/__init__.py": "from omni_attribute.errors import Error\n",
    "tests/test_x.py": "import lab\nimport nodes\n",
}


def tree(tmp_path: Path, changes: dict[str, str]) -> Path:
    return write_tree(tmp_path / "repo", {**CLEAN, **changes})


def test_clean_fake_tree_passes(tmp_path):
    root = tree(tmp_path, {})
    assert library_import_violations(root) == []
    assert adapter_import_violations(root) == []
    assert import_cycles(root) == []
    assert repository_read_violations(root) == []
    assert shipped_imports_of_repo_code(root) == []
    assert set(import_graph(root)["omni_attribute.encoder"]) == {"omni_attribute.errors", "omni_attribute.prompt"}
    assert set(import_graph(root)["omni_attribute.train.config"]) == {"omni_attribute.encoder", "omni_attribute.errors"}


@pytest.mark.parametrize("source, expected", [
    ("import comfy\n", "omni_attribute/bad.py:1: import comfy"),
    ("import comfy.model_management as mm\n", "ComfyUI: comfy.model_management"),
    ("from comfy_api.latest import io\n", "ComfyUI: comfy_api.latest"),
    ("def f():\n    import folder_paths\n", "omni_attribute/bad.py:2: import folder_paths"),
    ("def f():\n    from server import PromptServer\n", "ComfyUI: server"),
    ("import importlib\nm = importlib.import_module('comfy_extras.nodes_flux')\n", "bad.py:2"),
    ("from nodes import folders\n", "ComfyUI: nodes"),
    ("from lab.world import pairs\n", "repository code: lab.world"),
    ("class A:\n    def f(self):\n        import devtools.fixtures\n", "bad.py:3: import devtools.fixtures"),
    ("import tests.conftest\n", "repository code: tests.conftest"),
    ("import benchmarks.timing\n", "repository code: benchmarks.timing"),
    ("from ..nodes import folders\n", "relative import leaves the omni_attribute package: nodes"),
    ("from .. import lab\n", "relative import leaves the omni_attribute package"),
])
def test_library_import_check_fails(tmp_path, source, expected):
    root = tree(tmp_path, {"omni_attribute/bad.py": source})
    problems = library_import_violations(root)
    assert len(problems) >= 1 and any(expected in p for p in problems), problems


@pytest.mark.parametrize("source, expected", [
    ("from ..omni_attribute.encoder import encode\n", "nodes/bad.py:1: from ..omni_attribute.encoder import encode  (reaches the library relatively"),
    ("from .. import omni_attribute\n", "reaches the library relatively"),
    ("from ComfyUI_Omni.omni_attribute import encoder\n", "under another name"),
    ("import lab.demo\n", "nodes/bad.py:1: import lab.demo  (the ComfyUI adapter must not import lab/)"),
    ("def f():\n    from devtools.fixtures import x\n", "nodes/bad.py:2"),
    ("from ..lab import demo\n", "must not import lab/"),
    ("import tests\n", "must not import tests/"),
    ("from ...x import y\n", "climbs above the repository"),
])
def test_adapter_import_check_fails(tmp_path, source, expected):
    root = tree(tmp_path, {"nodes/bad.py": source})
    problems = adapter_import_violations(root)
    assert any(expected in p for p in problems), problems


def test_cycle_check_fails_and_names_the_path(tmp_path):
    root = tree(tmp_path, {
        "omni_attribute/errors.py": "from .train import config\n",   # errors -> train.config -> encoder -> errors
    })
    problems = import_cycles(root)
    assert len(problems) == 1, problems
    message = problems[0]
    assert "omni_attribute.encoder -> omni_attribute.errors -> omni_attribute.train.config -> omni_attribute.encoder" in message
    assert "omni_attribute/errors.py:1: from .train import config" in message
    assert "omni_attribute/train/config.py:1: from ..encoder import encode" in message
    assert "omni_attribute/encoder.py:4: from .errors import Error" in message


def test_cycle_check_absolute_imports_and_self_import(tmp_path):
    root = tree(tmp_path, {
        "omni_attribute/a.py": "import omni_attribute.b\n",
        "omni_attribute/b.py": "try:\n    from omni_attribute.a import x\nexcept ImportError:\n    pass\n",
        "omni_attribute/c.py": "from omni_attribute import c\n",
    })
    problems = import_cycles(root)
    assert len(problems) == 2, problems
    assert any("omni_attribute.a -> omni_attribute.b -> omni_attribute.a" in p and "omni_attribute/b.py:2" in p
               for p in problems), problems
    assert any("omni_attribute.c -> omni_attribute.c" in p for p in problems), problems


def test_cycle_check_ignores_function_level_and_type_checking_imports(tmp_path):
    root = tree(tmp_path, {
        "omni_attribute/errors.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .encoder import encode\n"
                                     "def f():\n    from .train.config import help\n"),
    })
    assert import_cycles(root) == []


@pytest.mark.parametrize("source, expected", [
    ("from pathlib import Path\nREPO = Path(__file__).resolve().parents[1]\nW = REPO / 'api_workflows'\n",
     "omni_attribute/bad.py:2"),
    ("from pathlib import Path\nW = Path(__file__).parent.parent / 'configs' / 'x.yaml'\n", "leaves the installed package"),
    ("import os\nW = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'lab')\n",
     "leaves the installed package"),
    ("from pathlib import Path\nREPO_ROOT = Path('.')\ndef f():\n    return REPO_ROOT / 'configs' / 'train_tiny.yaml'\n",
     "omni_attribute/bad.py:4: return REPO_ROOT / 'configs' / 'train_tiny.yaml'  (reads the repository folder 'configs'"),
    ("from pathlib import Path\ndef f():\n    return Path('api_workflows/encode_attributes.api.json').read_text()\n",
     "relative path into the repository folder 'api_workflows/encode_attributes.api.json'"),
    ("from pathlib import Path\nHERE = Path(__file__).resolve().parent\nROOT = HERE.parent\nW = ROOT / 'example_workflows'\n",
     "omni_attribute/bad.py:3: ROOT = HERE.parent  (a path 2 folder(s) up"),
    ("from pathlib import Path\ndef f(p):\n    return Path(p).parents[2] / 'lab' / 'world'\n",
     "reads the repository folder 'lab'"),
])
def test_repository_read_check_fails(tmp_path, source, expected):
    root = tree(tmp_path, {"omni_attribute/bad.py": source})
    problems = repository_read_violations(root)
    assert any(expected in p for p in problems), problems


def test_repository_read_check_depth_is_per_file(tmp_path):
    # parents[1] from omni_attribute/train/x.py is omni_attribute/ (fine); parents[2] is the repository root
    root = tree(tmp_path, {"omni_attribute/train/ok.py": "from pathlib import Path\nP = Path(__file__).parents[1] / 'configs'\n",
                           "omni_attribute/train/bad.py": "from pathlib import Path\nP = Path(__file__).parents[2] / 'configs'\n"})
    problems = repository_read_violations(root)
    assert problems and all("omni_attribute/train/bad.py:2" in p for p in problems), problems


@pytest.mark.parametrize("name, source, expected", [
    ("omni_attribute/bad.py", "def f():\n    from lab.world import pairs\n", "omni_attribute/bad.py:2"),
    ("nodes/bad.py", "import devtools.comfy_host\n", "nodes/bad.py:1: import devtools.comfy_host"),
    ("nodes/bad.py", "from ..lab.comfy_nodes import x\n", "nodes/bad.py:1"),
    ("__init__.py", "from .lab.comfy_nodes import comfy_entrypoint\n", "__init__.py:1: from .lab.comfy_nodes"),
    ("__init__.py", "import importlib\nimportlib.import_module('devtools.fixtures')\n", "__init__.py:2"),
])
def test_shipped_imports_check_fails(tmp_path, name, source, expected):
    root = tree(tmp_path, {name: source})
    problems = shipped_imports_of_repo_code(root)
    assert any(expected in p for p in problems), problems
