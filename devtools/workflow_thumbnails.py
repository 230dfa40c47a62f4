"""Thumbnails of the shipped UI workflows for ComfyUI's template browser: each ``example_workflows/<name>.json``
loaded in the real ComfyUI frontend (a live 0.3.75 server with this plugin, Debian's Chromium driven by
playwright-core, as in tests/browser/frontend.mjs), its graph fitted to the canvas and shot, then written as
``example_workflows/<name>.jpg`` (640×480 JPEG) — the file the frontend shows for the template ``<name>``.

    .venv/bin/python -m devtools.workflow_thumbnails            # every UI workflow (after scripts/setup.sh)
    .venv/bin/python -m devtools.workflow_thumbnails NAME ...   # only these (the file names without .json)

Run it again after changing a workflow, and commit the images. No model files are needed: the widgets show
the file names the workflows ask for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

from devtools.comfy_host import REPO, ComfyServer, cache_dir

EXAMPLES = REPO / "example_workflows"
SCRIPT = Path(__file__).resolve().with_suffix(".mjs")
SIZE = (640, 480)
QUALITY = 80


def ui_workflows(names: list[str] | None = None) -> list[Path]:
    """The UI-format workflows of ``example_workflows/`` (all, or those named), sorted."""
    files = sorted(EXAMPLES.glob("*.json"))
    if not names:
        return files
    missing = sorted(set(names) - {p.stem for p in files})
    if missing:
        raise SystemExit(f"no such workflow in {EXAMPLES}: {', '.join(missing)}")
    return [p for p in files if p.stem in names]


def screenshot(workflows: list[Path], out: Path) -> list[dict]:
    """PNG screenshots (one per workflow, into ``out``) from a fresh server; returns the script's records."""
    with ComfyServer(out / "comfy-base") as server:
        env = {**os.environ, "NODE_MODULES": str(cache_dir() / "node" / "node_modules")}
        result = subprocess.run(["node", str(SCRIPT), server.url, str(out), *map(str, workflows)],
                                capture_output=True, text=True, timeout=300, env=env)
    if result.returncode != 0:
        raise SystemExit(f"the browser script failed:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for error in sorted({e.splitlines()[0] for e in report["consoleErrors"]}):  # e.g. the absent reference.png
        print(f"[thumbnails] browser console: {error}")
    return report["shots"]


def write_thumbnail(png: Path, target: Path) -> int:
    """``png`` scaled to SIZE (aspect kept, centred on the canvas colour) as a JPEG at ``target``; its bytes."""
    shot = Image.open(png).convert("RGB")
    shot.thumbnail(SIZE, Image.Resampling.LANCZOS)
    card = Image.new("RGB", SIZE, shot.getpixel((0, 0)))
    card.paste(shot, ((SIZE[0] - shot.width) // 2, (SIZE[1] - shot.height) // 2))
    card.save(target, "JPEG", quality=QUALITY, optimize=True, progressive=True)
    return target.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.workflow_thumbnails", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="workflow names (file names in example_workflows/ without .json)")
    args = parser.parse_args(argv)
    workflows = ui_workflows(args.names)
    with tempfile.TemporaryDirectory(prefix="omni-attribute-thumbnails-") as tmp:
        for shot in screenshot(workflows, Path(tmp)):
            source = Path(shot["workflow"])
            target = source.with_suffix(".jpg")
            size = write_thumbnail(Path(shot["png"]), target)
            print(f"[thumbnails] {target.relative_to(REPO)}: {shot['nodes']} nodes, {size // 1024} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
