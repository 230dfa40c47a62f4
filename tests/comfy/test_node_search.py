"""Every node can be found by the words of its purpose: each has search words (nodes/search.py), the words a
user would type for it ("IP-Adapter", "reference image", "retrieval", "t-SNE", …) are among them, and every
word is in the node's description. ComfyUI 0.3.75's schema has no ``search_aliases``; one that has gets them."""

from __future__ import annotations

import dataclasses

import pytest

# the words a user looks for, per node (each must be one of the node's search words)
PURPOSE = {
    "OmniAttributeEncoderLoader": {"attribute encoder", "Qwen2.5-VL", "LoRA"},
    "OmniAttributeEncode": {"attribute", "reference image", "image embedding"},
    "OmniAttributeSaveEmbeds": {"save", "attribute embeddings"},
    "OmniAttributeLoadEmbeds": {"load", "attribute embeddings"},
    "OmniAttributeApply": {"IP-Adapter", "FLUX", "reference image", "personalization"},
    "OmniAttributeStack": {"composition", "multiple attributes"},
    "OmniAttributeFlowBlendGuider": {"composition", "guider", "FLUX"},
    "OmniAttributeBuildIndex": {"retrieval", "index", "image search"},
    "OmniAttributeRetrieve": {"retrieval", "image search", "similar images"},
    "OmniAttributeEmbeddingMap": {"t-SNE", "visualization"},
}


@pytest.fixture(scope="module")
def schemas(plugin_nodes) -> dict:
    """node id → the node's io.Schema (model folders registered first, as the plugin's entry point does)."""
    plugin_nodes.folders.register()
    return {schema.node_id: schema for schema in (node.define_schema() for node in plugin_nodes.NODES)}


def test_every_node_has_search_words_for_its_purpose(plugin_nodes, schemas):
    words = plugin_nodes.search.SEARCH_WORDS
    assert set(words) == set(schemas) == set(PURPOSE)
    for node_id, wanted in PURPOSE.items():
        assert wanted <= set(words[node_id]), (node_id, wanted - set(words[node_id]))


def test_every_search_word_is_in_the_description(plugin_nodes, schemas):
    for node_id, schema in schemas.items():
        description = schema.description.lower()
        assert "attribute" in description, node_id
        missing = [w for w in plugin_nodes.search.SEARCH_WORDS[node_id] if w.lower() not in description]
        assert not missing, f"{node_id}: {missing} not in {schema.description!r}"


def test_search_aliases_go_where_the_schema_takes_them(plugin_nodes, schemas, monkeypatch):
    from comfy_api.latest import io

    assert not plugin_nodes.search.takes_search_aliases()  # ComfyUI 0.3.75
    assert all(not hasattr(schema, "search_aliases") for schema in schemas.values())

    @dataclasses.dataclass
    class LaterSchema(io.Schema):  # a ComfyUI whose Schema has the field
        search_aliases: list[str] = dataclasses.field(default_factory=list)

    monkeypatch.setattr(io, "Schema", LaterSchema)
    for node in plugin_nodes.NODES:
        schema = node.define_schema()
        assert schema.search_aliases == list(plugin_nodes.search.SEARCH_WORDS[schema.node_id])
