"""Shipped workflows (UI format in example_workflows/, API format in api_workflows/) and the laboratory's
(lab/workflows/): valid on the live server, UI and API twins agree, and each runs end to end through the
headless client (python -m omni_attribute.headless) with the FLUX loaders swapped for the tiny test fixtures."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omni_attribute.workflow import check_against_object_info, ui_to_api

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "example_workflows"       # UI format: ComfyUI's template browser lists these (and <title>.jpg)
API_WORKFLOWS = REPO / "api_workflows"      # API format, for headless runs (a folder ComfyUI does not scan)
LAB_WORKFLOWS = REPO / "lab" / "workflows"  # the laboratory's, both formats (they need its node pack)
# shipped: the API file's name → its UI twin's, the template's title in the browser
SHIPPED = {
    "compose_attributes": "Compose attributes from three images with FLUX",
    "embedding_map": "Attribute embedding map",
    "encode_attributes": "Encode image attributes to embeds",
    "personalize_attribute": "Personalize one attribute with FLUX",
    "retrieve_by_attribute": "Retrieve similar images by attribute",
}
LAB = ["tiny_world_compose"]
# (API file, UI file) of each workflow
CASES = ([(API_WORKFLOWS / f"{name}.api.json", EXAMPLES / f"{title}.json") for name, title in SHIPPED.items()]
         + [(LAB_WORKFLOWS / f"{name}.api.json", LAB_WORKFLOWS / f"{name}.json") for name in LAB])
IDS = [api.relative_to(REPO).as_posix() for api, _ in CASES]


def api_name(api: Path) -> str:
    return api.name.removesuffix(".api.json")


def test_every_workflow_has_both_formats():
    assert sorted(p.name for p in API_WORKFLOWS.iterdir()) == sorted(f"{name}.api.json" for name in SHIPPED)
    assert sorted(p.stem for p in EXAMPLES.glob("*.json")) == sorted(SHIPPED.values())
    assert not list(EXAMPLES.glob("*.api.json")), "API-format files belong in api_workflows/"
    assert sorted(p.name[:-len(".api.json")] for p in LAB_WORKFLOWS.glob("*.api.json")) == LAB
    # every other *.json of the laboratory is a UI twin, one per API file
    assert sorted(p.stem for p in LAB_WORKFLOWS.glob("*.json") if not p.name.endswith(".api.json")) == LAB


@pytest.mark.parametrize("api_file, ui_file", CASES, ids=IDS)
def test_workflow_is_valid_and_twins_agree(client, api_file, ui_file):
    info = client.object_info()
    api = json.loads(api_file.read_text())
    assert check_against_object_info(api, info) == []
    ui = json.loads(ui_file.read_text())
    assert ui_to_api(ui, info) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert any(node["type"] == "Note" for node in ui["nodes"]), "the UI workflow should tell the artist what to load"


def tiny_version(prompt: dict) -> dict:
    """Swap the full-size FLUX loaders for the test-only tiny fixtures (and the tiny world's trained files for
    the test server's 4-step ones); everything else stays."""
    prompt = copy.deepcopy(prompt)
    world = any(node["class_type"] == "OmniAttributeWorldGeneratorLoader" for node in prompt.values())
    adapter = "tiny-world-ip.safetensors" if world else "tiny-ip.safetensors"
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            prompt[node_id] = {"class_type": "OmniTestTinyModel", "inputs": {"family": "flux", "seed": 0}}
        elif kind in ("DualCLIPLoader", "VAELoader"):
            del prompt[node_id]
        elif kind == "CLIPTextEncode":
            prompt[node_id] = {"class_type": "OmniTestConditioning",
                               "inputs": {"seed": len(inputs["text"]), "length": 5, "guidance": 3.5}}
        elif kind == "VAEDecode":
            prompt[node_id] = {"class_type": "OmniTestLatentToImage", "inputs": {"samples": inputs["samples"]}}
        elif kind == "OmniAttributeEncoderLoader":
            inputs.update(backbone="tiny-qwen25vl", adapter=adapter)
        elif kind in ("OmniAttributeApply", "OmniAttributeFlowBlendGuider"):
            inputs["adapter"] = adapter
        elif kind == "EmptySD3LatentImage":
            inputs.update(width=64, height=64)
        elif kind == "BasicScheduler":
            inputs["steps"] = 2
    return prompt


def run_cli(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "omni_attribute.headless", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def reference_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        path = folder / f"ref{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("api_file, ui_file", CASES, ids=IDS)
def test_workflow_runs_headlessly(comfy_server, api_file, ui_file, reference_images, tmp_path):
    name = api_name(api_file)
    prompt = tiny_version(json.loads(api_file.read_text()))
    workflow = tmp_path / f"{name}.tiny.api.json"
    workflow.write_text(json.dumps(prompt))
    loaders = [node_id for node_id, node in prompt.items() if node["class_type"] == "LoadImage"]
    for node in prompt.values():  # an index's folder (inside the server's input folder) holds the reference images
        if node["class_type"] == "OmniAttributeBuildIndex":
            gallery = comfy_server.base_dir / "input" / node["inputs"]["folder"]
            gallery.mkdir(parents=True, exist_ok=True)
            for path in reference_images:
                (gallery / path.name).write_bytes(path.read_bytes())
    sets = [f"{node_id}.image={path}" for node_id, path in zip(loaders, reference_images)]
    out = tmp_path / "out"
    result = run_cli(["run", str(workflow), "--server", comfy_server.url, "--out", str(out),
                      *[arg for s in sets for arg in ("--set", s)]])
    assert result.returncode == 0, result.stderr + result.stdout
    assert "[run] node" in result.stdout
    saved = sorted(out.iterdir())
    assert saved, result.stdout
    if name == "encode_attributes":
        assert saved[0].suffix == ".safetensors"
    elif name == "retrieve_by_attribute":  # the three gallery images, best first: the query (reference 0) itself
        hits = [np.asarray(Image.open(p).convert("RGB")) for p in saved]
        assert len(hits) == 3 and np.array_equal(hits[0], np.asarray(Image.open(reference_images[0]).convert("RGB")))
    elif name == "embedding_map":  # one panel (512 wide, 8 apart) per attribute line of the Encode node
        assert Image.open(saved[0]).size[0] == 3 * 512 + 2 * 8
    else:
        image = np.asarray(Image.open(saved[0]), dtype=np.int16)
        # the tiny FLUX's stand-in VAE draws each latent cell as an 8×8 block (8×8 latent → 64 px); the world's
        # decoder draws its 32-pixel images ×4 (→ 128 px)
        side, block = (128, 4) if api_file.parent == LAB_WORKFLOWS else (64, 8)
        assert image.shape == (side, side, 3)
        cells = image[::block, ::block]
        assert np.array_equal(np.repeat(np.repeat(cells, block, 0), block, 1), image), "not the decoder's blocks"
        # a sampled picture, not a flat or nearly flat field: its cells spread over more than an eighth of the
        # 8-bit range (measured: 104–105 for the tiny FLUX, 96 for the tiny world)
        assert cells.std() > 32, cells.std()


def test_cli_reports_errors_readably(comfy_server, reference_images, tmp_path):
    prompt = tiny_version(json.loads((API_WORKFLOWS / "personalize_attribute.api.json").read_text()))
    prompt["9"]["inputs"]["adapter"] = "tiny.safetensors"  # an adapter without IP-Adapter weights
    workflow = tmp_path / "broken.api.json"
    workflow.write_text(json.dumps(prompt))
    missing_image = run_cli(["run", str(workflow), "--server", comfy_server.url, "--out", str(tmp_path),
                             "--set", "4.image=no_such_image.png"])
    assert missing_image.returncode == 1 and "node 4 (LoadImage)" in missing_image.stderr
    failed = run_cli(["run", str(workflow), "--server", comfy_server.url, "--out", str(tmp_path),
                      "--set", f"4.image={reference_images[0]}"])
    assert failed.returncode == 1 and "has no IP-Adapter weights" in failed.stderr and "Traceback" not in failed.stderr
    assert "AdapterFileError:" in failed.stderr and "custom_nodes" not in failed.stderr
    usage = run_cli(["run", str(workflow), "--server", comfy_server.url, "--set", "nonsense"])
    assert usage.returncode == 2 and "NODE.INPUT=VALUE" in usage.stderr
    unknown = run_cli(["run", str(workflow), "--server", comfy_server.url, "--set", "9.no_such_input=1"])
    assert unknown.returncode == 2 and "has no input 'no_such_input'" in unknown.stderr
    ui_file = run_cli(["run", str(EXAMPLES / f"{SHIPPED['compose_attributes']}.json"), "--server", comfy_server.url])
    assert ui_file.returncode == 2 and "UI-format" in ui_file.stderr
    nobody = run_cli(["run", str(workflow), "--server", "http://127.0.0.1:9", "--out", str(tmp_path)])
    assert nobody.returncode == 1 and "cannot reach ComfyUI" in nobody.stderr
