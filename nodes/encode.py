"""Load Omni-Attribute Encoder · Omni-Attribute Encode."""

from __future__ import annotations

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io

from omni_attribute.encoder import load_encoder
from omni_attribute.prompt import parse_attribute_text

from . import folders
from .model_management import EncoderHandle, pick_devices, pick_dtype
from .sockets import Embeds, Encoder

CATEGORY = "Omni-Attribute"


class LoadOmniAttributeEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniAttributeEncoderLoader",
            display_name="Load Omni-Attribute Encoder",
            category=CATEGORY,
            description="Loads a Qwen2.5-VL backbone folder and an Omni-Attribute adapter (LoRA + connector).",
            inputs=[
                io.Combo.Input("backbone", options=folders.list_backbones(),
                               tooltip="HF-format Qwen2.5-VL folder in models/omni_attribute_backbones or models/LLM"),
                io.Combo.Input("adapter", options=folder_paths.get_filename_list(folders.ADAPTERS),
                               tooltip="Omni-Attribute adapter .safetensors in models/omni_attribute"),
                io.Combo.Input("dtype", options=["auto", "bf16", "fp16", "fp32"], default="auto"),
                io.Combo.Input("device", options=["default", "cpu", "gpu"], default="default",
                               tooltip="default: ComfyUI's text-encoder device; the encoder is offloaded while sampling"),
            ],
            outputs=[Encoder.Output(display_name="encoder")],
        )

    @classmethod
    def execute(cls, backbone: str, adapter: str, dtype: str, device: str) -> io.NodeOutput:
        backbone_path = folders.resolve_backbone(backbone)
        adapter_path = folder_paths.get_full_path_or_raise(folders.ADAPTERS, adapter)
        load_device, offload_device = pick_devices(device)
        torch_dtype = pick_dtype(dtype, load_device)
        encoder = load_encoder(backbone_path, adapter_path, dtype=torch_dtype, device=offload_device)
        return io.NodeOutput(EncoderHandle.wrap(encoder, load_device, offload_device))


class OmniAttributeEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniAttributeEncode",
            display_name="Omni-Attribute Encode",
            category=CATEGORY,
            description=("Embeds only the named attribute(s) of each image. One line = one embedding; "
                         "commas combine attributes in one instruction ('man identity, man hairstyle')."),
            inputs=[
                Encoder.Input("encoder"),
                io.Image.Input("image", tooltip="one or more reference images (a batch gives one row per image and line)"),
                io.String.Input("attributes", multiline=True, default="object color",
                                placeholder="e.g. image lighting\nman identity, man hairstyle"),
            ],
            outputs=[Embeds.Output(display_name="embeds")],
        )

    @classmethod
    def validate_inputs(cls, attributes: str | None = None) -> bool | str:
        if attributes is None:  # linked from another node: checked when it runs
            return True
        try:
            parse_attribute_text(attributes)
        except Exception as exc:  # shown by ComfyUI as a validation error on this node
            return str(exc)
        return True

    @classmethod
    def execute(cls, encoder: EncoderHandle, image, attributes: str) -> io.NodeOutput:
        encoder.load()
        progress = comfy.utils.ProgressBar(image.shape[0])

        def image_done(done: int, total: int) -> None:
            progress.update_absolute(done, total)
            mm.throw_exception_if_processing_interrupted()

        embeds = encoder.encoder.encode(image, attributes, on_image_done=image_done)
        return io.NodeOutput(embeds)
