"""The plugin as ComfyUI sees it: /object_info and the start-up log.

The test server links three node packs: the plugin, the laboratory's (the tiny world) and the tests' fixtures.
/object_info's ``python_module`` ("custom_nodes.<link name>") tells which pack registered each node."""

import pytest

from devtools.comfy_host import LAB_NODES, PLUGIN_LINK_NAME

pytestmark = pytest.mark.host

PLUGIN_MODULE = f"custom_nodes.{PLUGIN_LINK_NAME}"
(LAB_MODULE,) = (f"custom_nodes.{name}" for name in LAB_NODES)
FIXTURE_MODULE = "custom_nodes.omni_attribute_test_nodes"
FIXTURES = {"OmniTestImage", "OmniTestTinyModel", "OmniTestConditioning", "OmniTestLatentToImage", "OmniTestLatentStats"}

EXPECTED = {
    "OmniAttributeEncoderLoader": ({"backbone", "adapter", "dtype", "device"}, ["OMNI_ATTRIBUTE_ENCODER"]),
    "OmniAttributeEncode": ({"encoder", "image", "attributes"}, ["OMNI_ATTRIBUTE_EMBEDS"]),
    "OmniAttributeSaveEmbeds": ({"embeds", "filename_prefix"}, []),
    "OmniAttributeLoadEmbeds": ({"embeds_file"}, ["OMNI_ATTRIBUTE_EMBEDS"]),
    "OmniAttributeApply": ({"model", "embeds", "adapter", "weight", "start_percent", "end_percent", "apply_to",
                            "combine"}, ["MODEL"]),
    "OmniAttributeStack": ({"embeds", "weight", "start_percent", "end_percent"}, ["OMNI_ATTRIBUTE_STACK"]),
    "OmniAttributeFlowBlendGuider": ({"model", "adapter", "positive", "empty", "stack", "text_scale", "mode"},
                                     ["GUIDER"]),
    "OmniAttributeBuildIndex": ({"encoder", "attributes", "folder", "index_name", "rebuild"}, ["OMNI_ATTRIBUTE_INDEX"]),
    "OmniAttributeRetrieve": ({"index", "encoder", "image", "attribute", "k"}, ["IMAGE"]),
    "OmniAttributeEmbeddingMap": ({"image", "attributes", "style", "seed"}, ["IMAGE"]),
}
WORLD = {
    "OmniAttributeWorldGeneratorLoader": ({"generator"}, ["MODEL", "OMNI_ATTRIBUTE_WORLD_TEXT"]),
    "OmniAttributeWorldTextEncode": ({"text_encoder", "text"}, ["CONDITIONING"]),
    "OmniAttributeWorldEmptyLatent": ({"batch_size"}, ["LATENT"]),
    "OmniAttributeWorldDecode": ({"samples", "scale"}, ["IMAGE"]),
}


def nodes_of(info: dict, module: str) -> set[str]:
    return {name for name, node in info.items() if node["python_module"] == module}


def test_the_plugin_registers_exactly_its_nodes_and_no_laboratory_node(client):
    info = client.object_info()
    assert nodes_of(info, PLUGIN_MODULE) == set(EXPECTED)
    assert nodes_of(info, LAB_MODULE) == set(WORLD)
    assert nodes_of(info, FIXTURE_MODULE) == FIXTURES
    # no other custom node pack is loaded, and everything else is ComfyUI's own
    assert {node["python_module"] for node in info.values() if node["python_module"].startswith("custom_nodes.")} \
        == {PLUGIN_MODULE, LAB_MODULE, FIXTURE_MODULE}


def test_object_info_lists_every_node_with_its_sockets(client):
    info = client.object_info()
    ours = {name for name, node in info.items() if node.get("category") == "Omni-Attribute"}
    assert ours == set(EXPECTED)
    world = {name for name, node in info.items() if node.get("category") == "Omni-Attribute/tiny world"}
    assert world == set(WORLD)
    assert info["OmniAttributeWorldGeneratorLoader"]["input"]["required"]["generator"][1]["options"] == ["tiny-world"]
    for name, (inputs, outputs) in {**EXPECTED, **WORLD}.items():
        node = info[name]
        assert set(node["input"]["required"]) == inputs, name
        assert node["output"] == outputs, name
    assert info["OmniAttributeSaveEmbeds"]["output_node"] is True
    assert info["OmniAttributeEncode"]["input"]["required"]["image"][0] == "IMAGE"
    assert set(info["OmniAttributeApply"]["input"]["optional"]) == {"mask"}
    assert set(info["OmniAttributeStack"]["input"]["optional"]) == {"stack", "stack_2", "rows"}


def test_model_folders_are_listed_and_user_paths_kept(client, comfy_base):
    loader = client.object_info()["OmniAttributeEncoderLoader"]["input"]["required"]
    # the two folders in models/omni_attribute_backbones and, from the user's extra_model_paths.yaml root
    # <base_path>/qwen, its folder user-qwen (names are relative to the root they are found in)
    assert loader["backbone"][1]["options"] == ["no-weights", "tiny-qwen25vl", "user-qwen"]
    # every adapter file in models/omni_attribute, whatever other tests have added there, and nothing else
    on_disk = sorted(p.name for p in (comfy_base / "models" / "omni_attribute").glob("*.safetensors"))
    assert {"tiny.safetensors", "hidden32.safetensors", "truncated.safetensors",
            "other_pack_ip_adapter.safetensors"} <= set(on_disk)
    assert loader["adapter"][1]["options"] == on_disk


def test_log_shows_the_plugin_imported_cleanly(comfy_server):
    log = comfy_server.log_text().split("Starting server")[0]  # start-up only; later prompts fail on purpose
    plugin_lines = [line for line in log.splitlines() if "comfyui-omni-attribute" in line]
    assert plugin_lines, "the plugin does not appear in ComfyUI's import list"
    assert not [line for line in plugin_lines if "IMPORT FAILED" in line or "Cannot import" in line], plugin_lines
    # ComfyUI's optional core extras (kornia, spandrel, torchaudio) may fail; no traceback may touch custom nodes
    tracebacks = log.split("Traceback (most recent call last):")[1:]
    assert not [t for t in tracebacks if "custom_nodes" in t.split("\n\n")[0]], tracebacks


def test_frontend_extension_and_help_pages_are_served(client):
    script = client._request("/extensions/comfyui-omni-attribute/js/omni_attribute.js").decode()
    assert "registerExtension" in script and "OmniAttributeSaveEmbeds" in script
    page = client._request("/extensions/comfyui-omni-attribute/docs/OmniAttributeEncode.md").decode()
    assert page.startswith("# Omni-Attribute Encode")
