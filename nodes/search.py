"""What a user may type to find each node ("IP-Adapter", "reference image", "retrieval", "t-SNE", …), and the
``io.Schema`` every node is defined with.

ComfyUI 0.3.75's ``io.Schema`` has no ``search_aliases`` field, and its frontend (1.32.9) searches node ids
and display names only. So each node's description carries its search words (the tooltip, the node library's
preview; a test checks that every word is there), and a ComfyUI whose ``io.Schema`` has ``search_aliases``
(later releases) gets them as search aliases too.
"""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

SEARCH_WORDS: dict[str, tuple[str, ...]] = {
    "OmniAttributeEncoderLoader": ("attribute encoder", "Qwen2.5-VL", "MLLM", "vision-language model", "LoRA"),
    "OmniAttributeEncode": ("attribute", "encode", "reference image", "image embedding", "attribute embedding"),
    "OmniAttributeSaveEmbeds": ("save", "attribute embeddings", "safetensors"),
    "OmniAttributeLoadEmbeds": ("load", "attribute embeddings", "safetensors", "reuse"),
    "OmniAttributeApply": ("IP-Adapter", "FLUX", "reference image", "personalization", "attribute transfer"),
    "OmniAttributeStack": ("composition", "multiple attributes", "flow blend", "weight", "schedule"),
    "OmniAttributeFlowBlendGuider": ("composition", "multiple attributes", "guider", "CFG", "FLUX",
                                     "SamplerCustomAdvanced"),
    "OmniAttributeBuildIndex": ("retrieval", "index", "image search", "similarity search", "gallery"),
    "OmniAttributeRetrieve": ("retrieval", "image search", "similar images", "nearest neighbours",
                              "cosine similarity"),
    "OmniAttributeEmbeddingMap": ("t-SNE", "visualization", "embedding plot", "clustering", "silhouette"),
}


def takes_search_aliases() -> bool:
    """Whether this ComfyUI's ``io.Schema`` has a ``search_aliases`` field (0.3.75's has not)."""
    return any(field.name == "search_aliases" for field in dataclasses.fields(io.Schema))


def schema(**fields) -> io.Schema:
    """``io.Schema(**fields)``, with the node's ``SEARCH_WORDS`` as ``search_aliases`` where ComfyUI takes them."""
    if takes_search_aliases():
        fields.setdefault("search_aliases", list(SEARCH_WORDS[fields["node_id"]]))
    return io.Schema(**fields)
