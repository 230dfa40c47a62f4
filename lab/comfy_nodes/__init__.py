"""The laboratory's ComfyUI node pack (not part of the shipped plugin): the tiny attribute world in
ComfyUI — load a tiny generator folder (ComfyUI's own FLUX with its weights), encode captions with its
text encoder, make an empty 32×32 latent and decode latents to pixels.

The world's "VAE" is an exact pixel codec (2×2 pixel-unshuffle), so decoding needs no weights. The
main job and the tests link this folder into ComfyUI's ``custom_nodes`` beside the plugin (with the
repository on ``PYTHONPATH``, see ``devtools/comfy_host.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import comfy.latent_formats
import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io
from safetensors.torch import load_file

from devtools.comfy_flux import build_comfy_flux
from omni_attribute.flux_models import FluxLayout, diffusers_to_comfy_flux
from omni_attribute.train.generator import (
    TINY_GENERATOR_META,
    PixelCodec,
    load_tiny_text_encoder,
    read_tiny_generator_meta,
)

WEB_DIRECTORY = "./web"  # node help pages: web/docs/<node id>.md
GENERATORS = "omni_attribute_world"  # model folder key: models/omni_attribute_world/<name>/
CATEGORY = "Omni-Attribute/tiny world"


def list_generators() -> list[str]:
    roots = folder_paths.get_folder_paths(GENERATORS) if GENERATORS in folder_paths.folder_names_and_paths else []
    return sorted(entry.name for root in roots if os.path.isdir(root) for entry in os.scandir(root)
                  if os.path.isfile(os.path.join(entry.path, TINY_GENERATOR_META)))


def resolve_generator(name: str) -> Path:
    if name not in list_generators():
        raise FileNotFoundError(f"{name!r} is not a tiny generator folder in models/{GENERATORS}: the main job "
                                "(bash scripts/demo.sh) installs one there")
    for root in folder_paths.get_folder_paths(GENERATORS):
        if os.path.isfile(os.path.join(root, name, TINY_GENERATOR_META)):
            return Path(root, name)
    raise FileNotFoundError(f"tiny generator folder {name!r} disappeared while loading")


def load_for_comfy(folder: Path):
    """(ComfyUI FLUX ``BaseModel``, text encoder): the diffusers weights mapped onto ComfyUI's own FLUX,
    with the linear sigma schedule (shift 1) the world's sampler uses."""
    layout = FluxLayout.from_dict(read_tiny_generator_meta(folder)["layout"])
    weights = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    model = build_comfy_flux(layout, sampling_shift=1.0)
    model.diffusion_model.load_state_dict(diffusers_to_comfy_flux(weights, layout), strict=True)
    return model.eval(), load_tiny_text_encoder(folder)
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
            inputs=[io.Combo.Input("generator", options=list_generators(),
                                   tooltip="a generator folder in models/omni_attribute_world")],
            outputs=[io.Model.Output(), WorldText.Output(display_name="text_encoder")],
        )

    @classmethod
    def execute(cls, generator: str) -> io.NodeOutput:
        model, text_encoder = load_for_comfy(resolve_generator(generator))
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


class TinyWorldExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadTinyWorldGenerator, TinyWorldTextEncode, TinyWorldEmptyLatent, TinyWorldDecode]


async def comfy_entrypoint() -> TinyWorldExtension:
    if GENERATORS not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[GENERATORS] = ([os.path.join(folder_paths.models_dir, GENERATORS)], set())
    return TinyWorldExtension()
