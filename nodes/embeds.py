"""Save / Load Omni-Attribute Embeds: reuse an embedding without loading the MLLM again."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from omni_attribute.embeds import load_embeds, save_embeds

from . import folders
from .sockets import Embeds

CATEGORY = "Omni-Attribute"


class SaveOmniAttributeEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniAttributeSaveEmbeds",
            display_name="Save Omni-Attribute Embeds",
            category=CATEGORY,
            description="Writes embeds to output/omni_attribute_embeds/ as .safetensors (Load Omni-Attribute Embeds reads them).",
            is_output_node=True,
            inputs=[
                Embeds.Input("embeds"),
                io.String.Input("filename_prefix", default="omni_attribute"),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, embeds, filename_prefix: str) -> io.NodeOutput:
        output_dir = folder_paths.get_output_directory()
        full_folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            os.path.join(folders.EMBEDS_SUBFOLDER, filename_prefix), output_dir)
        filename = f"{name}_{counter:05}_.safetensors"  # trailing _ lets ComfyUI find the next counter
        save_embeds(os.path.join(full_folder, filename), embeds)
        result = {"filename": filename, "subfolder": subfolder, "type": "output"}
        return io.NodeOutput(ui={"omni_attribute_embeds": [result], **ui.PreviewText(embeds.summary()).as_dict()})


class LoadOmniAttributeEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniAttributeLoadEmbeds",
            display_name="Load Omni-Attribute Embeds",
            category=CATEGORY,
            description="Reads embeds saved by Save Omni-Attribute Embeds (output/ or input/omni_attribute_embeds).",
            inputs=[io.Combo.Input("embeds_file", options=folder_paths.get_filename_list(folders.EMBEDS))],
            outputs=[Embeds.Output(display_name="embeds")],
        )

    @classmethod
    def fingerprint_inputs(cls, embeds_file: str):
        path = folder_paths.get_full_path(folders.EMBEDS, embeds_file)
        return os.path.getmtime(path) if path else embeds_file

    @classmethod
    def execute(cls, embeds_file: str) -> io.NodeOutput:
        return io.NodeOutput(load_embeds(folder_paths.get_full_path_or_raise(folders.EMBEDS, embeds_file)))
