"""Model folders the plugin reads from, registered without clobbering extra_model_paths.yaml.

``extra_model_paths.yaml`` is applied before custom nodes load, so a key may already exist with
the user's paths: we append our default paths behind theirs and set the file extensions.
"""

from __future__ import annotations

import os
import re

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


TEXT_ENCODERS = "text_encoders"                 # ComfyUI's own folder: qwen_2.5_vl_7b*.safetensors
TEXT_ENCODER_PREFIX = "text_encoders/"          # how those files appear among the backbone options
QWEN_VL_NAME = re.compile(r"qwen.*vl", re.IGNORECASE)


def list_text_encoder_files() -> list[str]:
    """Qwen2.5-VL files in ComfyUI's text_encoders folder (by name: listing must not read every file)."""
    if TEXT_ENCODERS not in folder_paths.folder_names_and_paths:
        return []
    return [TEXT_ENCODER_PREFIX + n for n in folder_paths.get_filename_list(TEXT_ENCODERS)
            if n.lower().endswith(".safetensors") and QWEN_VL_NAME.search(os.path.basename(n))]


def list_backbones() -> list[str]:
    """HF folders first (the options existing workflows hold), then ComfyUI's Qwen2.5-VL text-encoder files."""
    return list_model_folders(BACKBONES, "config.json") + list_text_encoder_files()


BACKBONE_WHAT = "HF-format Qwen2.5-VL folder (or ComfyUI's qwen_2.5_vl_7b*.safetensors in models/text_encoders)"


def backbone_problem(name) -> str | None:
    if isinstance(name, str) and name.startswith(TEXT_ENCODER_PREFIX):
        file = name[len(TEXT_ENCODER_PREFIX):]
        if not file.lower().endswith(".safetensors"):
            return f"backbone {short(name)}: a text-encoder backbone must be a .safetensors file (qwen_2.5_vl_7b*.safetensors)"
        if file in folder_paths.get_filename_list(TEXT_ENCODERS):  # any file there: a wrong model is explained at load
            if folder_paths.get_full_path(TEXT_ENCODERS, file) is None:
                return f"backbone {name!r} is listed but cannot be read (a broken link?): fix or remove it"
            return None
        listed = ", ".join(repr(o) for o in list_text_encoder_files()[:8]) or "none"
        return (f"backbone {short(name)} is not a file in {', '.join(folder_paths.get_folder_paths(TEXT_ENCODERS))}: "
                f"put ComfyUI's qwen_2.5_vl_7b.safetensors (or its fp8_scaled variant) there, or pick one of {listed}")
    return model_folder_problem("backbone", BACKBONES, name, "config.json", BACKBONE_WHAT)


def resolve_backbone(name: str) -> str:
    """Full path of a backbone option: an HF folder, or a text-encoder file."""
    if isinstance(name, str) and name.startswith(TEXT_ENCODER_PREFIX):
        problem = backbone_problem(name)
        if problem:
            raise InputError(problem)
        return folder_paths.get_full_path(TEXT_ENCODERS, name[len(TEXT_ENCODER_PREFIX):])
    return resolve_model_folder(BACKBONES, name, "config.json", BACKBONE_WHAT)


def qwen25_tokenizer_dir() -> str:
    """ComfyUI's shipped Qwen2.5 tokenizer (comfy/text_encoders/qwen25_tokenizer), for text-encoder backbones."""
    import comfy  # a namespace package: no __file__

    roots = [os.path.realpath(p) for p in getattr(comfy, "__path__", [])]
    paths = [os.path.join(root, "text_encoders", "qwen25_tokenizer") for root in roots]
    for path in paths:
        if os.path.isfile(os.path.join(path, "vocab.json")):
            return path
    where = paths[0] if paths else "comfy/text_encoders/qwen25_tokenizer"
    raise InputError(f"ComfyUI's Qwen2.5 tokenizer is missing ({where}): the ComfyUI install is incomplete; "
                     "reinstall ComfyUI, or use an HF-format backbone folder (it carries its own tokenizer)")
