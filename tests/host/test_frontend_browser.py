"""The web/ extension in a real browser: Debian's Chromium driven by Playwright against the live server."""

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.host

SCRIPT = Path(__file__).resolve().parents[1] / "browser" / "frontend.mjs"


def node_modules() -> str:
    cache = Path(os.environ.get("OMNI_ATTRIBUTE_CACHE", Path.home() / ".cache" / "omni-attribute"))
    return str(cache / "node" / "node_modules")


def test_extension_counts_embeddings_and_shows_the_summary(comfy_server, tmp_path):
    shot = tmp_path / "frontend.png"
    result = subprocess.run(["node", str(SCRIPT), comfy_server.url, str(shot)], capture_output=True, text=True,
                            timeout=240, env={**os.environ, "NODE_MODULES": node_modules()})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["extensionLoaded"] is True
    assert report["titles"][1] == "Omni-Attribute Encode (3 embeddings per image)"
    assert report["titles"][2] == "Omni-Attribute Encode (no attribute yet)"
    suggestions = report["suggestions"]
    assert {"person hairstyle", "image lighting", "object material", "camera angle"} <= set(suggestions["options"])
    assert suggestions["text"] == "object color\nperson hairstyle"  # appended once as a new line
    assert suggestions["title"] == "Omni-Attribute Encode (2 embeddings per image)"
    assert suggestions["reset"] == suggestions["options"][0]  # the picker goes back to its prompt
    assert suggestions["serialized"] == ["object color\nperson hairstyle"]  # the picker is not saved
    assert report["summary"]["value"] == "2 embedding(s): tokens [2, 4, 64]"
    assert report["summary"]["serialized"] == ["omni_attribute"]  # the display widget is not saved in workflows
    assert not [e for e in report["consoleErrors"] if "omni_attribute" in e.lower()], report["consoleErrors"]
    assert shot.stat().st_size > 10_000
