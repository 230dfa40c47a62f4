"""Save / Load Omni-Attribute Embeds: reuse an embedding without loading the MLLM again."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from omni_attribute.embeds import load_embeds, save_embeds
from omni_attribute.errors import EmbedsFileError, InputError

from . import folders, inputs
from .search import schema
from .sockets import Embeds

CATEGORY = "Omni-Attribute"


class SaveOmniAttributeEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="OmniAttributeSaveEmbeds",
            display_name="Save Omni-Attribute Embeds",
            category=CATEGORY,
            description=("Saves attribute embeddings to output/omni_attribute_embeds/<prefix>_00001_.safetensors "
                         "(Load Omni-Attribute Embeds lists them); never replaces an existing file, the counter "
                         "moves on."),
            is_output_node=True,
            inputs=[
                Embeds.Input("embeds"),
                io.String.Input("filename_prefix", default="omni_attribute",
                                tooltip="file name (may include sub-folders: 'faces/smile'); empty or ending in '/' "
                                        "adds 'omni_attribute'"),
            ],
            outputs=[],
        )

    @classmethod
    def validate_inputs(cls, embeds=None, filename_prefix=None) -> bool | str:
        return inputs.verdict(inputs.EMBEDS.literal_problem("embeds", embeds),
                              inputs.prefix_problem("filename_prefix", filename_prefix))

    @classmethod
    def execute(cls, embeds, filename_prefix: str) -> io.NodeOutput:
        inputs.EMBEDS.require("embeds", embeds)
        inputs.ensure(inputs.prefix_problem("filename_prefix", filename_prefix))
        result, listed = save_new(embeds, filename_prefix)
        result["embeds_file"] = listed  # the name Load Omni-Attribute Embeds lists it under
        return io.NodeOutput(ui={"omni_attribute_embeds": [result], **ui.PreviewText(embeds.summary()).as_dict()})


DEFAULT_PREFIX = "omni_attribute"
MAX_TRIES = 10000


def save_new(embeds, filename_prefix: str) -> tuple[dict, str]:
    """Write ``embeds`` to output/omni_attribute_embeds/<prefix>_<counter>_.safetensors, where Load Embeds lists
    it. An existing file is never replaced: the counter moves on past every taken name (also names that another
    embeds folder already lists, and names another writer takes at the same moment: the final name is created
    exclusively). An empty file name part (an empty prefix, or one ending in '/') becomes 'omni_attribute'."""
    output_dir = folder_paths.get_output_directory()
    root = os.path.join(output_dir, folders.EMBEDS_SUBFOLDER)
    prefix = inputs.clean_prefix(filename_prefix, DEFAULT_PREFIX)
    # before any folder is made: a link inside the embeds folder must not lead the save elsewhere
    if not inputs.inside(os.path.join(root, os.path.dirname(prefix)), root):
        raise InputError(f"filename_prefix {filename_prefix!r} leads out of {root} through a link: save into a "
                         "folder inside it")
    try:
        full_folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            os.path.join(folders.EMBEDS_SUBFOLDER, prefix), output_dir)
    except OSError as exc:
        raise InputError(f"filename_prefix {filename_prefix!r}: cannot use the folder {os.path.dirname(prefix)!r} "
                         f"in {root} ({exc.strerror or exc}; is there a file of that name?): choose another "
                         "prefix") from exc
    for _ in range(MAX_TRIES):
        filename = f"{name}_{counter:05}_.safetensors"  # trailing _ lets ComfyUI find the next counter
        listed = os.path.relpath(os.path.join(full_folder, filename), root).replace(os.sep, "/")
        if folder_paths.get_full_path(folders.EMBEDS, listed) is None:  # no embeds folder lists this name yet
            try:
                save_embeds(os.path.join(full_folder, filename), embeds, replace=False)
                return {"filename": filename, "subfolder": subfolder, "type": "output"}, listed
            except FileExistsError:
                pass
            except OSError as exc:
                raise EmbedsFileError(f"could not write {listed} in {root} ({exc.strerror or exc}): free disk space or "
                                      "fix the folder's permissions, then run again") from exc
        counter += 1
    raise InputError(f"filename_prefix {filename_prefix!r}: {MAX_TRIES} names after {name}_{counter - MAX_TRIES:05}_ "
                     "are taken: choose another prefix")


class LoadOmniAttributeEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="OmniAttributeLoadEmbeds",
            display_name="Load Omni-Attribute Embeds",
            category=CATEGORY,
            description=("Loads attribute embeddings saved by Save Omni-Attribute Embeds (.safetensors in output/ or "
                         "input/omni_attribute_embeds), to reuse them without loading the encoder."),
            inputs=[io.Combo.Input("embeds_file", options=folder_paths.get_filename_list(folders.EMBEDS))],
            outputs=[Embeds.Output(display_name="embeds")],
        )

    @classmethod
    def validate_inputs(cls, embeds_file=None) -> bool | str:
        return inputs.verdict(inputs.file_problem("embeds_file", embeds_file, folders.EMBEDS, EMBEDS_WHAT))

    @classmethod
    def fingerprint_inputs(cls, embeds_file: str):
        path = folder_paths.get_full_path(folders.EMBEDS, embeds_file) if isinstance(embeds_file, str) else None
        return os.path.getmtime(path) if path else embeds_file

    @classmethod
    def execute(cls, embeds_file: str) -> io.NodeOutput:
        return io.NodeOutput(load_embeds(inputs.resolve_file("embeds_file", embeds_file, folders.EMBEDS, EMBEDS_WHAT)))


EMBEDS_WHAT = "embeds .safetensors file (written by Save Omni-Attribute Embeds)"
