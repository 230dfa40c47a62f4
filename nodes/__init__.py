"""The ComfyUI adapter: V3 nodes that hand ComfyUI types to the ``omni_attribute`` library.

The only shipped code that imports ComfyUI (``comfy*``, ``comfy_api``, ``folder_paths``). One module
per feature: ``encode`` (encoder loader, Encode), ``embeds`` (save/load), ``apply`` (the IP-Adapter
patch on a FLUX MODEL), ``flow_blend`` (Stack, Flow Blend Guider), ``retrieve`` (Build Attribute Index,
Retrieve by Attribute, Embedding Map).
"""

from comfy_api.latest import ComfyExtension, io

from . import folders
from .apply import ApplyOmniAttribute
from .embeds import LoadOmniAttributeEmbeds, SaveOmniAttributeEmbeds
from .encode import LoadOmniAttributeEncoder, OmniAttributeEncode
from .flow_blend import OmniAttributeFlowBlendGuider, OmniAttributeStack
from .retrieve import OmniAttributeBuildIndex, OmniAttributeEmbeddingMap, OmniAttributeRetrieve

NODES: list[type[io.ComfyNode]] = [
    LoadOmniAttributeEncoder,
    OmniAttributeEncode,
    SaveOmniAttributeEmbeds,
    LoadOmniAttributeEmbeds,
    ApplyOmniAttribute,
    OmniAttributeStack,
    OmniAttributeFlowBlendGuider,
    OmniAttributeBuildIndex,
    OmniAttributeRetrieve,
    OmniAttributeEmbeddingMap,
]


class OmniAttributeExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> OmniAttributeExtension:
    folders.register()
    return OmniAttributeExtension()
