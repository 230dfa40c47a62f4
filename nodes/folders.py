"""Model folders the plugin reads from, registered without clobbering extra_model_paths.yaml.

``extra_model_paths.yaml`` is applied before custom nodes load, so a key may already exist with
the user's paths: we append our default paths behind theirs and set the file extensions.
"""

from __future__ import annotations

import os

import folder_paths

ADAPTERS = "omni_attribute"                     # adapter .safetensors files
BACKBONES = "omni_attribute_backbones"          # HF-format MLLM folders
EMBEDS = "omni_attribute_embeds"                # saved attribute embeds
EMBEDS_SUBFOLDER = "omni_attribute_embeds"
SAFETENSORS = {".safetensors"}


def extend(key: str, defaults: list[str], extensions: set[str]) -> None:
    if key in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[key]
        for path in defaults:
            if path not in paths:
                paths.append(path)
        if isinstance(exts, set):
            exts.update(extensions)
        else:
            folder_paths.folder_names_and_paths[key] = (paths, set(exts) | extensions)
    else:
        folder_paths.folder_names_and_paths[key] = (list(defaults), set(extensions))


def register() -> None:
    models = folder_paths.models_dir
    extend(ADAPTERS, [os.path.join(models, "omni_attribute")], SAFETENSORS)
    extend(BACKBONES, [os.path.join(models, "omni_attribute_backbones"), os.path.join(models, "LLM")], set())
    extend(EMBEDS, [os.path.join(folder_paths.get_output_directory(), EMBEDS_SUBFOLDER),
                     os.path.join(folder_paths.get_input_directory(), EMBEDS_SUBFOLDER)], SAFETENSORS)


def list_model_folders(key: str, marker: str) -> list[str]:
    """Sub-folders (up to two levels deep) of ``key``'s paths holding ``marker``, as 'name' or 'org/name'."""
    found: set[str] = set()
    for root in folder_paths.get_folder_paths(key):
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            if os.path.isfile(os.path.join(entry.path, marker)):
                found.add(entry.name)
                continue
            for child in os.scandir(entry.path):
                if child.is_dir() and os.path.isfile(os.path.join(child.path, marker)):
                    found.add(f"{entry.name}/{child.name}")
    return sorted(found)


def resolve_model_folder(key: str, name: str, marker: str, what: str) -> str:
    """Full path of a listed folder. Names that are not listed (e.g. '../x') are refused."""
    if name not in list_model_folders(key, marker):
        raise FileNotFoundError(
            f"{name!r} is not in any registered {key} folder ({', '.join(folder_paths.get_folder_paths(key))}): "
            f"put the {what} there"
        )
    for root in folder_paths.get_folder_paths(key):
        path = os.path.join(root, *name.split("/"))
        if os.path.isfile(os.path.join(path, marker)):
            return path
    raise FileNotFoundError(f"{key} folder {name!r} disappeared while loading")


def list_backbones() -> list[str]:
    return list_model_folders(BACKBONES, "config.json")


def resolve_backbone(name: str) -> str:
    return resolve_model_folder(BACKBONES, name, "config.json", "HF-format Qwen2.5-VL folder")
