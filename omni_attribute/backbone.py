"""The MLLM backbone: a Qwen2.5-VL model, tokenizer and image processor from an HF-format folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BackboneError

# A slow Qwen2.5 tokenizer folder (what ComfyUI ships); HF downloads carry tokenizer.json as well
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")

SUPPORTED_FAMILIES = ("qwen2_5_vl",)

# Qwen2.5-VL's chat format, written out so that folders without a chat template work too.
SYSTEM_PROMPT = "You are a helpful assistant."
PREFIX_TEMPLATE = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|>{image}<|vision_end|>"
SUFFIX_TEMPLATE = "{instruction}<|im_end|>\n<|im_start|>assistant\n"
IMAGE_PAD = "<|image_pad|>"


@dataclass
class Backbone:
    model: torch.nn.Module          # Qwen2_5_VLForConditionalGeneration
    tokenizer: object
    image_processor: object         # Qwen2VLImageProcessor
    folder: str

    @property
    def config(self):
        return self.model.config

    def info(self) -> dict:
        """What an adapter records about the backbone it was trained on."""
        text = getattr(self.config, "text_config", self.config)
        return {
            # the instance attribute reports the text sub-config's type; the class knows the family
            "family": type(self.config).model_type,
            "hidden_size": text.hidden_size,
            "num_hidden_layers": text.num_hidden_layers,
            "name": Path(self.folder).name,
        }

    @property
    def merge_size(self) -> int:
        return self.config.vision_config.spatial_merge_size

    @property
    def patch_factor(self) -> int:
        """Image sides must be multiples of this (patch size x merge size)."""
        return self.config.vision_config.patch_size * self.merge_size


def read_folder_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise BackboneError(f"backbone folder {str(folder)!r} does not exist: put an HF-format Qwen2.5-VL folder there")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BackboneError(
            f"backbone folder {folder.name!r} has no config.json: it must be a Hugging Face model folder "
            "(e.g. Qwen2.5-VL-7B-Instruct as downloaded, with config.json, *.safetensors and tokenizer files)"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise BackboneError(f"{folder.name}/config.json is not valid JSON ({exc})") from exc
    family = config.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise BackboneError(
            f"backbone folder {folder.name!r} holds a {family!r} model; Omni-Attribute supports "
            f"{', '.join(SUPPORTED_FAMILIES)} (Qwen2.5-VL) backbones"
        )
    return config


def load_backbone(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  meta: bool = False) -> Backbone:
    """Load model, tokenizer and image processor. Only safetensors weights are read (never pickles)."""
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    folder = Path(folder)
    read_folder_config(folder)
    if not meta and not any(folder.glob("*.safetensors")):
        raise BackboneError(
            f"backbone folder {folder.name!r} has no *.safetensors weights (only safetensors are loaded, "
            "never pickled .bin files): convert or re-download the model"
        )
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise BackboneError(f"backbone folder {folder.name!r} has no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, fix_mistral_regex=False)
        if meta:
            with torch.device("meta"):
                model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(str(folder)))
        else:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                str(folder), dtype=dtype, local_files_only=True, use_safetensors=True, attn_implementation="sdpa",
            )
    except BackboneError:
        raise
    except Exception as exc:  # transformers raises many types; name the folder and the cause
        raise BackboneError(f"could not load backbone folder {folder.name!r}: {type(exc).__name__}: {exc}") from exc
    if (folder / "preprocessor_config.json").is_file():
        image_processor = Qwen2VLImageProcessor.from_pretrained(str(folder), local_files_only=True)
    else:
        vision = model.config.vision_config
        image_processor = Qwen2VLImageProcessor(
            patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
        )
    for token in ("<|vision_start|>", "<|vision_end|>", IMAGE_PAD, "<|im_start|>", "<|im_end|>"):
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise BackboneError(f"the tokenizer in {folder.name!r} lacks the Qwen2.5-VL token {token}")
    if not meta:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return Backbone(model=model, tokenizer=tokenizer, image_processor=image_processor, folder=str(folder))
