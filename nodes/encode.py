"""Load Omni-Attribute Encoder · Omni-Attribute Encode."""

from __future__ import annotations

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io

from omni_attribute.comfy_text_encoder_file import is_text_encoder_file
from omni_attribute.encoder import load_encoder
from omni_attribute.errors import OmniAttributeError
from omni_attribute.float8 import WEIGHT_DTYPES as FLOAT8_CHOICES
from omni_attribute.prompt import parse_attribute_text

from . import folders, inputs
from .model_management import EncoderHandle, pick_devices, pick_dtype
from .search import schema
from .sockets import Embeds, Encoder

CATEGORY = "Omni-Attribute"
DTYPES = ["auto", "bf16", "fp16", "fp32"]
DEVICES = ["default", "cpu", "gpu"]
WEIGHT_DTYPES = list(FLOAT8_CHOICES)
ADAPTER_WHAT = "Omni-Attribute adapter .safetensors file"


class LoadOmniAttributeEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="OmniAttributeEncoderLoader",
            display_name="Load Omni-Attribute Encoder",
            category=CATEGORY,
            description=("Loads the attribute encoder: a Qwen2.5-VL backbone (the vision-language model, MLLM: an HF "
                         "folder, or ComfyUI's own qwen_2.5_vl_7b text-encoder file) and an Omni-Attribute adapter "
                         "(LoRA + connector)."),
            inputs=[
                io.Combo.Input("backbone", options=folders.list_backbones(),
                               tooltip=("HF-format Qwen2.5-VL folder in models/omni_attribute_backbones or models/LLM, "
                                        "or text_encoders/qwen_2.5_vl_7b*.safetensors (ComfyUI's Qwen-Image text "
                                        "encoder, plain or fp8_scaled: no second download)")),
                io.Combo.Input("adapter", options=folder_paths.get_filename_list(folders.ADAPTERS),
                               tooltip="Omni-Attribute adapter .safetensors in models/omni_attribute"),
                io.Combo.Input("dtype", options=DTYPES, default="auto"),
                io.Combo.Input("device", options=DEVICES, default="default",
                               tooltip="default: ComfyUI's text-encoder device; the encoder is offloaded while sampling"),
                io.Combo.Input("weight_dtype", options=WEIGHT_DTYPES, default="default", optional=True,
                               tooltip=("default: the backbone's weights in dtype; fp8_e4m3fn: its Linear weights held "
                                        "in 8 bits (per-row scales, computed in dtype): about half the memory of bf16")),
            ],
            outputs=[Encoder.Output(display_name="encoder")],
        )

    @classmethod
    def validate_inputs(cls, backbone=None, adapter=None, dtype=None, device=None, weight_dtype=None) -> bool | str:
        return inputs.verdict(folders.backbone_problem(backbone),
                              inputs.file_problem("adapter", adapter, folders.ADAPTERS, ADAPTER_WHAT),
                              inputs.choice_problem("dtype", dtype, DTYPES),
                              inputs.choice_problem("device", device, DEVICES),
                              inputs.choice_problem("weight_dtype", weight_dtype, WEIGHT_DTYPES))

    @classmethod
    def execute(cls, backbone: str, adapter: str, dtype: str, device: str,
                weight_dtype: str = "default") -> io.NodeOutput:
        inputs.ensure(inputs.choice_problem("dtype", dtype, DTYPES), inputs.choice_problem("device", device, DEVICES),
                      inputs.choice_problem("weight_dtype", weight_dtype, WEIGHT_DTYPES))
        backbone_path = folders.resolve_backbone(backbone)
        adapter_path = inputs.resolve_file("adapter", adapter, folders.ADAPTERS, ADAPTER_WHAT)
        tokenizer_dir = folders.qwen25_tokenizer_dir() if is_text_encoder_file(backbone_path) else None
        load_device, offload_device = pick_devices(device)
        torch_dtype = pick_dtype(dtype, load_device)
        encoder = load_encoder(backbone_path, adapter_path, dtype=torch_dtype, device=offload_device,
                               weight_dtype=weight_dtype, tokenizer_dir=tokenizer_dir)
        return io.NodeOutput(EncoderHandle.wrap(encoder, load_device, offload_device))


class OmniAttributeEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="OmniAttributeEncode",
            display_name="Omni-Attribute Encode",
            category=CATEGORY,
            description=("Encodes each reference image into an attribute embedding of only the named attribute(s), "
                         "not a whole-image embedding. One line = one embedding; commas combine attributes in one "
                         "instruction ('man identity, man hairstyle')."),
            inputs=[
                Encoder.Input("encoder"),
                io.Image.Input("image", tooltip="one or more reference images (a batch gives one row per image and line)"),
                io.String.Input("attributes", multiline=True, default="object color",
                                placeholder="e.g. image lighting\nman identity, man hairstyle"),
            ],
            outputs=[Embeds.Output(display_name="embeds")],
        )

    @classmethod
    def validate_inputs(cls, encoder=None, image=None, attributes: str | None = None) -> bool | str:
        return inputs.verdict(inputs.ENCODER.literal_problem("encoder", encoder),
                              inputs.IMAGE.literal_problem("image", image), attribute_problem(attributes))

    @classmethod
    def execute(cls, encoder: EncoderHandle, image, attributes: str) -> io.NodeOutput:
        inputs.ENCODER.require("encoder", encoder)
        inputs.IMAGE.require("image", image)
        inputs.ensure(attribute_problem(attributes))
        encoder.load()
        progress = comfy.utils.ProgressBar(image.shape[0] if image.ndim == 4 else 1)

        def image_done(done: int, total: int) -> None:
            progress.update_absolute(done, total)
            mm.throw_exception_if_processing_interrupted()

        embeds = encoder.encoder.encode(image, attributes, on_image_done=image_done)
        return io.NodeOutput(embeds)


def attribute_problem(attributes) -> str | None:
    if attributes is None:  # linked from another node: checked when it runs
        return None
    try:
        parse_attribute_text(attributes)
    except OmniAttributeError as exc:  # shown by ComfyUI as a validation error on this node
        return f"attributes: {exc}"
    return None
