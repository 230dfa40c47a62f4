"""ComfyUI glue: V3 nodes that adapt ComfyUI types to the omni_attribute library."""

from comfy_api.latest import ComfyExtension, io

from . import folders
from .embeds_nodes import LoadOmniAttributeEmbeds, SaveOmniAttributeEmbeds
from .encoder_nodes import LoadOmniAttributeEncoder, OmniAttributeEncode
from .guider_nodes import OmniAttributeFlowBlendGuider, OmniAttributeStack
from .ip_nodes import ApplyOmniAttribute
from .world_nodes import LoadTinyWorldGenerator, TinyWorldDecode, TinyWorldEmptyLatent, TinyWorldTextEncode

NODES: list[type[io.ComfyNode]] = [
    LoadOmniAttributeEncoder,
    OmniAttributeEncode,
    SaveOmniAttributeEmbeds,
    LoadOmniAttributeEmbeds,
    ApplyOmniAttribute,
    OmniAttributeStack,
    OmniAttributeFlowBlendGuider,
    LoadTinyWorldGenerator,
    TinyWorldTextEncode,
    TinyWorldEmptyLatent,
    TinyWorldDecode,
]


class OmniAttributeExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> OmniAttributeExtension:
    folders.register()
    return OmniAttributeExtension()
