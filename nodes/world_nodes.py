"""The tiny attribute world in ComfyUI: load its generator (ComfyUI's own FLUX with the world's weights),
encode captions with its text encoder, make an empty 32×32 latent and decode latents to pixels.

The world's "VAE" is an exact pixel codec (2×2 pixel-unshuffle), so decoding needs no weights."""

from __future__ import annotations

import torch
from comfy_api.latest import io

import comfy.latent_formats
import comfy.model_management as mm
import comfy.model_patcher

from ..omni_attribute.train.generator import PixelCodec
from ..omni_attribute.world.generator import load_world_for_comfy
from . import folders

CATEGORY = "Omni-Attribute/tiny world"
WorldText = io.Custom("OMNI_ATTRIBUTE_WORLD_TEXT")
WORLD_IMAGE_SIZE = 32


class LoadTinyWorldGenerator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniAttributeWorldGeneratorLoader",
            display_name="Load Tiny-World Generator",
            category=CATEGORY,
            description="The tiny attribute world's text-to-image FLUX (trained by benchmarks/tiny_world.py) "
                        "and its text encoder.",
            inputs=[io.Combo.Input("generator", options=folders.list_world_generators(),
                                   tooltip="a generator folder in models/omni_attribute_world")],
            outputs=[io.Model.Output(), WorldText.Output(display_name="text_encoder")],
        )

    @classmethod
    def execute(cls, generator: str) -> io.NodeOutput:
        model, text_encoder, _ = load_world_for_comfy(folders.resolve_world_generator(generator))
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        return io.NodeOutput(patcher, text_encoder)


class TinyWorldTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniAttributeWorldTextEncode",
            display_name="Tiny-World Text Encode",
            category=CATEGORY,
            description="A world caption ('a small striped red circle on a gray background, lit from above') "
                        "→ conditioning; an empty text gives the unconditional branch.",
            inputs=[WorldText.Input("text_encoder"), io.String.Input("text", multiline=True, default="")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text_encoder, text: str) -> io.NodeOutput:
        with torch.no_grad():
            context, pooled = text_encoder([text.strip()])
        # guidance 1.0: the value the world generator was trained with
        return io.NodeOutput([[context, {"pooled_output": pooled, "guidance": 1.0}]])


class TinyWorldEmptyLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniAttributeWorldEmptyLatent",
            display_name="Tiny-World Empty Latent",
            category=CATEGORY,
            description=f"An empty latent for {WORLD_IMAGE_SIZE}×{WORLD_IMAGE_SIZE} world images.",
            inputs=[io.Int.Input("batch_size", default=1, min=1, max=64)],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, batch_size: int) -> io.NodeOutput:
        side = WORLD_IMAGE_SIZE // 2
        return io.NodeOutput({"samples": torch.zeros(batch_size, PixelCodec.latent_channels, side, side)})


class TinyWorldDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniAttributeWorldDecode",
            display_name="Tiny-World Decode",
            category=CATEGORY,
            description="World latents → images (exact pixel codec), enlarged by `scale` (nearest) for viewing.",
            inputs=[io.Latent.Input("samples"), io.Int.Input("scale", default=4, min=1, max=32)],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples: dict, scale: int) -> io.NodeOutput:
        latent = samples["samples"].float().cpu()
        if latent.ndim != 4 or latent.shape[1] != PixelCodec.latent_channels:
            raise ValueError(f"Tiny-World Decode needs a {PixelCodec.latent_channels}-channel image latent, got shape "
                             f"{tuple(latent.shape)}: connect the sampler that used the tiny-world generator")
        # the sampler hands back latents in ComfyUI's FLUX latent space; the generator works in its own
        rgb = PixelCodec().decode(comfy.latent_formats.Flux().process_in(latent))
        if scale > 1:
            rgb = torch.nn.functional.interpolate(rgb, scale_factor=scale, mode="nearest")
        return io.NodeOutput(rgb.permute(0, 2, 3, 1).contiguous())
