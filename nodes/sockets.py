"""Socket types the plugin's nodes exchange."""

from comfy_api.latest import io

Encoder = io.Custom("OMNI_ATTRIBUTE_ENCODER")
Embeds = io.Custom("OMNI_ATTRIBUTE_EMBEDS")
Stack = io.Custom("OMNI_ATTRIBUTE_STACK")
