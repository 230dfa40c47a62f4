"""A live ComfyUI 0.3.75 server with the plugin, the laboratory's node pack and the test node pack linked, and
model files laid out; API prompts are built with ComfyUI's own ``GraphBuilder``.

Models (made on the fly, tiny but real): models/omni_attribute_backbones/{tiny-qwen25vl, no-weights},
a tiny-world generator in models/omni_attribute_world/tiny-world,
a second backbone root added through --extra-model-paths-config (to show the plugin keeps it),
and adapters in models/omni_attribute: a good one, one for another hidden size, a truncated one
and a foreign safetensors file.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from devtools.comfy_host import LAB_NODES, ComfyServer, comfyui_root
from devtools.fixtures import make_untrained_adapter
from omni_attribute.flux_models import FluxLayout
from omni_attribute.headless import ComfyClient

FIXTURE_NODES = Path(__file__).resolve().parent.parent / "fixtures" / "comfy_test_nodes"


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory, tiny_backbone, tiny_adapter, narrow_adapter, world_generator) -> Path:
    base = tmp_path_factory.mktemp("comfy-base")
    backbones = base / "models" / "omni_attribute_backbones"
    backbones.mkdir(parents=True)
    shutil.copytree(tiny_backbone, backbones / "tiny-qwen25vl")
    no_weights = backbones / "no-weights"
    shutil.copytree(tiny_backbone, no_weights)
    for weights in no_weights.glob("*.safetensors"):
        weights.unlink()
    adapters = base / "models" / "omni_attribute"
    adapters.mkdir(parents=True)
    shutil.copy(tiny_adapter, adapters / "tiny.safetensors")
    shutil.copy(narrow_adapter, adapters / "hidden32.safetensors")
    (adapters / "truncated.safetensors").write_bytes(Path(tiny_adapter).read_bytes()[:4096])
    save_file({"image_proj.weight": torch.zeros(2, 2)}, str(adapters / "other_pack_ip_adapter.safetensors"))
    # adapters with IP-Adapter weights for the tiny FLUX (and two that do not fit it)
    tiny = FluxLayout.tiny()
    make_untrained_adapter(tiny_backbone, adapters / "tiny-ip.safetensors", seed=4, generator_layout=tiny)
    deeper = FluxLayout(**{**tiny.to_dict(), "depth_double": 4})
    make_untrained_adapter(tiny_backbone, adapters / "tiny-ip-4-double-blocks.safetensors", seed=5,
                           generator_layout=deeper)
    make_untrained_adapter(tiny_backbone, adapters / "tiny-ip-32-wide.safetensors", seed=6, out_dim=32,
                           generator_layout=FluxLayout(**{**tiny.to_dict(), "context_dim": 32}))
    # the tiny world: its generator folder and an adapter whose IP-Adapter fits that generator
    from lab.world.generator import WORLD_LAYOUT

    shutil.copytree(world_generator, base / "models" / "omni_attribute_world" / "tiny-world")
    make_untrained_adapter(tiny_backbone, adapters / "tiny-world-ip.safetensors", seed=7, generator_layout=WORLD_LAYOUT)
    extra = tmp_path_factory.mktemp("user-models")
    (extra / "qwen").mkdir()
    shutil.copytree(tiny_backbone, extra / "qwen" / "user-qwen")
    (base / "extra_model_paths.yaml").write_text(
        f"user_models:\n  base_path: {extra}\n  omni_attribute_backbones: qwen\n")
    return base


@pytest.fixture(scope="session")
def comfy_server(comfy_base):
    server = ComfyServer(comfy_base, custom_nodes={**LAB_NODES, "omni_attribute_test_nodes": FIXTURE_NODES},
                         extra_args=["--extra-model-paths-config", str(comfy_base / "extra_model_paths.yaml")])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(comfy_server) -> ComfyClient:
    return ComfyClient(comfy_server.url, timeout=300)


def graph_builder():
    """ComfyUI's own ``GraphBuilder`` (API-format prompts), node ids "1", "2", ... in creation order.

    ``comfy_execution/graph_utils.py`` imports nothing and ``comfy_execution`` has no ``__init__.py``, so this
    loads that one module and none of the rest of ComfyUI. The root is appended, not prepended, to sys.path:
    ComfyUI's top-level ``nodes.py`` must not shadow the plugin's ``nodes`` package."""
    root = str(comfyui_root())
    if root not in sys.path:
        sys.path.append(root)
    from comfy_execution.graph_utils import GraphBuilder

    return GraphBuilder(prefix="")


def test_image(width=64, height=64, channels=3, batch=1, seed=0, poison_nan=False) -> tuple[str, dict]:
    """An image source node for ``encode_graph``: (class_type, inputs) of the test pack's OmniTestImage."""
    return "OmniTestImage", dict(width=width, height=height, channels=channels, batch=batch, seed=seed,
                                 poison_nan=poison_nan)


def encode_graph(image: tuple[str, dict], attributes: str = "object color", backbone: str = "tiny-qwen25vl",
                 adapter: str = "tiny.safetensors", prefix: str = "test") -> dict:
    """API-format prompt: image source (class_type, inputs) → Load encoder → Encode → Save embeds."""
    graph = graph_builder()
    source = graph.node(image[0], **image[1])
    encoder = graph.node("OmniAttributeEncoderLoader", backbone=backbone, adapter=adapter, dtype="auto",
                         device="default")
    encode = graph.node("OmniAttributeEncode", encoder=encoder.out(0), image=source.out(0), attributes=attributes)
    graph.node("OmniAttributeSaveEmbeds", embeds=encode.out(0), filename_prefix=prefix)
    return graph.finalize()


def fetch_embeds(client, history: dict, tmp_path: Path):
    from omni_attribute.headless import node_outputs
    from omni_attribute.embeds import load_embeds

    (item,) = node_outputs(history, "omni_attribute_embeds")
    local = tmp_path / item["filename"]
    local.write_bytes(client.view(item["filename"], item["subfolder"], item["type"]))
    return load_embeds(local), item


@pytest.fixture(scope="session")
def graphs():
    """The prompt helpers above, for test modules (conftest modules are not importable by name)."""
    class Graphs:
        builder = staticmethod(graph_builder)
        encode = staticmethod(encode_graph)
        image = staticmethod(test_image)
        fetch = staticmethod(fetch_embeds)
    return Graphs
