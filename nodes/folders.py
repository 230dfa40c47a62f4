"""Model folders the plugin reads from, registered without clobbering extra_model_paths.yaml.

``extra_model_paths.yaml`` is applied before custom nodes load, so a key may already exist with
the user's paths: we append our default paths behind theirs and set the file extensions.
"""

from __future__ import annotations

import os

import folder_paths

from omni_attribute.errors import InputError
from omni_attribute.validation import short

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
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError:  # unreadable folder: nothing listed from it
            continue
        for entry in entries:
            if not entry.is_dir():
                continue
            if os.path.isfile(os.path.join(entry.path, marker)):
                found.add(entry.name)
                continue
            try:
                children = list(os.scandir(entry.path))
            except OSError:
                continue
            for child in children:
                if child.is_dir() and os.path.isfile(os.path.join(child.path, marker)):
                    found.add(f"{entry.name}/{child.name}")
    return sorted(found)


def model_folder_problem(input_name: str, key: str, name, marker: str, what: str) -> str | None:
    """None when ``name`` is a listed folder, else what to do (names that are not listed, e.g. '../x', are refused)."""
    if name is None:  # linked from another node: checked when it runs
        return None
    options = list_model_folders(key, marker)
    if isinstance(name, str) and name in options:
        return None
    listed = ", ".join(repr(o) for o in options[:8]) or "none"
    return (f"{input_name} {short(name)} is not in any registered {key} folder "
            f"({', '.join(folder_paths.get_folder_paths(key))}): put the {what} there, or pick one of {listed}")


def resolve_model_folder(key: str, name: str, marker: str, what: str, input_name: str = "backbone") -> str:
    """Full path of a listed folder. Names that are not listed (e.g. '../x') are refused."""
    problem = model_folder_problem(input_name, key, name, marker, what)
    if problem:
        raise InputError(problem)
    for root in folder_paths.get_folder_paths(key):
        path = os.path.join(root, *name.split("/"))
        if os.path.isfile(os.path.join(path, marker)):
            return path
    raise InputError(f"{input_name}: the {key} folder {name!r} disappeared while loading: put it back and run again")


def list_backbones() -> list[str]:
    return list_model_folders(BACKBONES, "config.json")


BACKBONE_WHAT = "HF-format Qwen2.5-VL folder"


def backbone_problem(name) -> str | None:
    return model_folder_problem("backbone", BACKBONES, name, "config.json", BACKBONE_WHAT)


def resolve_backbone(name: str) -> str:
    return resolve_model_folder(BACKBONES, name, "config.json", BACKBONE_WHAT)
