"""The MLLM backbone: a Qwen2.5-VL model, tokenizer and image processor from an HF-format folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BackboneError
from .validation import MAX_LAYERS, MAX_WIDTH, Fields, json_type, short

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
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BackboneError(f"{folder.name}/config.json is not valid JSON ({exc}): re-download the model "
                            "folder") from exc
    if not isinstance(config, dict):
        raise BackboneError(f"{folder.name}/config.json must hold a JSON object, found {json_type(config)}: "
                            "re-download the model folder")
    family = config.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise BackboneError(
            f"backbone folder {folder.name!r} holds a {short(family)} model; Omni-Attribute supports "
            f"{', '.join(SUPPORTED_FAMILIES)} (Qwen2.5-VL) backbones"
        )
    fields = Fields(config, "", f"{folder.name}/config.json", BackboneError, "re-download the model folder", "field")
    text = fields.obj("text_config", {}) if "text_config" in config else fields
    for key, high in (("hidden_size", MAX_WIDTH), ("num_hidden_layers", MAX_LAYERS)):
        (text if key in text.data else fields).integer(key, 1, high)
    # bounded, so that a damaged config cannot ask for an absurd allocation
    for key, high in (("intermediate_size", 8 * MAX_WIDTH), ("vocab_size", 1 << 20)):
        if key in text.data or key in config:
            (text if key in text.data else fields).integer(key, 1, high)
    refuse_remote_code(folder)
    return config


def read_backbone_config(source: str | Path) -> dict:
    """The HF config of a backbone folder (its config.json) or of ComfyUI's text-encoder file (from its header)."""
    from .comfy_text_encoder_file import check_qwen25_vl, infer_config, is_text_encoder_file, read_header

    if is_text_encoder_file(source):
        header = read_header(source)
        check_qwen25_vl(Path(source).name, header)
        return infer_config(header)
    return read_folder_config(source)


def refuse_remote_code(folder: Path) -> None:
    """Model folders that ask to run their own Python code (``auto_map``) are refused: a node user cannot and
    should not switch that on; Qwen2.5-VL needs no code beyond transformers'."""
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        data = _read_json(folder, name)
        if isinstance(data, dict) and data.get("auto_map"):
            raise BackboneError(
                f"backbone folder {folder.name!r} asks to run its own Python code ('auto_map' in {name}); "
                "Omni-Attribute never runs code from model folders. Use the standard Qwen2.5-VL files "
                "(e.g. Qwen/Qwen2.5-VL-7B-Instruct as published), or remove 'auto_map' if the code is not needed"
            )


PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_weight_files(folder: Path) -> None:
    """Readable safetensors weights (every shard an index names present, every header intact), or an error
    naming the file: before transformers reads anything."""
    files = sorted(p for p in folder.glob("*.safetensors"))
    broken = [p.name for p in files if not p.is_file()]
    if broken:
        raise BackboneError(f"backbone folder {folder.name!r}: {broken[0]} is a broken link or not a file: "
                            "re-download it or fix the link")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError, AttributeError) as exc:
            raise BackboneError(f"backbone folder {folder.name!r}: model.safetensors.index.json is damaged (no valid "
                                "'weight_map'): re-download it") from exc
        absent = [s for s in shards if not isinstance(s, str) or not (folder / s).is_file()]
        if absent:
            raise BackboneError(f"backbone folder {folder.name!r}: the weight shard {absent[0]} named in "
                                "model.safetensors.index.json is missing: finish or repeat the download")
    if not files:
        pickled = sorted(p.name for pattern in PICKLED for p in folder.glob(pattern))
        if pickled:
            raise BackboneError(
                f"backbone folder {folder.name!r} holds only pickled weights ({', '.join(pickled[:3])}): "
                "Omni-Attribute refuses pickled formats on purpose (loading them can run arbitrary code). "
                "Download the safetensors version of the model, or convert the weights to .safetensors"
            )
        raise BackboneError(
            f"backbone folder {folder.name!r} has no *.safetensors weights (only safetensors are loaded, "
            "never pickled .bin files): convert or re-download the model"
        )
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            raise BackboneError(f"backbone folder {folder.name!r}: weights file {path.name} is damaged or truncated "
                                f"({exc}): re-download it") from exc


def load_backbone(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  meta: bool = False, weight_dtype: str = "default", tokenizer_dir: str | Path | None = None) -> Backbone:
    """Load model, tokenizer and image processor. Only safetensors weights are read (never pickles).

    ``folder`` is an HF-format folder, or ComfyUI's Qwen2.5-VL text-encoder file (one .safetensors, see
    ``comfy_text_encoder_file``), whose tokenizer comes from ``tokenizer_dir`` (ComfyUI's qwen25_tokenizer).
    ``weight_dtype="fp8_e4m3fn"`` holds the Linear weights in float8 with per-row scales (``float8``)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from .comfy_text_encoder_file import build_model, is_text_encoder_file
    from .float8 import WEIGHT_DTYPES, quantize_linears

    if weight_dtype not in WEIGHT_DTYPES:
        raise BackboneError(f"weight_dtype {short(weight_dtype)} is not one of {', '.join(WEIGHT_DTYPES)}")
    folder = Path(folder)
    if is_text_encoder_file(folder):
        if tokenizer_dir is None:
            raise BackboneError(f"{folder.name} is a text-encoder file without tokenizer files: pass the Qwen2.5 "
                                "tokenizer folder (ComfyUI ships it in comfy/text_encoders/qwen25_tokenizer)")
        tokenizer = load_tokenizer(Path(tokenizer_dir))
        try:
            model = build_model(folder, dtype, weight_dtype)
        except BackboneError:
            raise
        except Exception as exc:
            raise BackboneError(f"could not load {folder.name!r} as a Qwen2.5-VL model ({_first_line(exc)}): use "
                                "ComfyUI's qwen_2.5_vl_7b*.safetensors text-encoder file") from exc
        return finish_backbone(model, tokenizer, None, folder, device)
    read_folder_config(folder)
    if not meta:
        check_weight_files(folder)
    tokenizer = load_tokenizer(folder)
    if (folder / "preprocessor_config.json").is_file():
        _read_json(folder, "preprocessor_config.json")
    try:
        if meta:
            with torch.device("meta"):
                model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(str(folder)))
        else:
            model, loading = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                str(folder), dtype=dtype, local_files_only=True, use_safetensors=True, attn_implementation="sdpa",
                output_loading_info=True,
            )
            missing = sorted(loading.get("missing_keys") or [])
            if missing:  # transformers would fill them with random numbers: refuse instead
                raise BackboneError(
                    f"backbone folder {folder.name!r}: its weights lack {len(missing)} tensor(s) the model needs (e.g. "
                    f"{', '.join(missing[:2])}): the download is incomplete or the files are damaged; re-download it")
    except BackboneError:
        raise
    except Exception as exc:  # transformers raises many types; name the folder and say what it means
        raise BackboneError(explain_load_failure(folder, exc)) from exc
    if weight_dtype == "fp8_e4m3fn" and not meta:
        quantize_linears(model, dtype)
    image_processor = None
    if (folder / "preprocessor_config.json").is_file():
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        try:
            image_processor = Qwen2VLImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise BackboneError(f"backbone folder {folder.name!r}: preprocessor_config.json cannot be used "
                                f"({_first_line(exc)}): re-download it") from exc
    return finish_backbone(model, tokenizer, image_processor, folder, None if meta else device)


def load_tokenizer(folder: Path):
    """The Qwen2.5 tokenizer of a model folder (tokenizer.json, or vocab.json + merges.txt)."""
    from transformers import AutoTokenizer

    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise BackboneError(f"backbone folder {folder.name!r} has no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            _read_json(folder, name)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, fix_mistral_regex=False)
    except Exception as exc:  # transformers raises many types (and blames e.g. a missing protobuf)
        raise BackboneError(
            f"backbone folder {folder.name!r}: its tokenizer cannot be loaded ({_first_line(exc)}): re-download "
            "the tokenizer files (tokenizer.json, or vocab.json + merges.txt, and tokenizer_config.json)") from exc


def finish_backbone(model, tokenizer, image_processor, source: Path, device) -> Backbone:
    """Image processor (from the vision config unless given), token check, device, eval mode, frozen."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    if image_processor is None:
        vision = model.config.vision_config
        image_processor = Qwen2VLImageProcessor(
            patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
        )
    for token in ("<|vision_start|>", "<|vision_end|>", IMAGE_PAD, "<|im_start|>", "<|im_end|>"):
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise BackboneError(f"the tokenizer for {source.name!r} lacks the Qwen2.5-VL token {token}")
    if device is not None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return Backbone(model=model, tokenizer=tokenizer, image_processor=image_processor, folder=str(source))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _read_json(folder: Path, name: str):
    try:
        return json.loads((folder / name).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BackboneError(f"{folder.name}/{name} is not valid JSON ({exc}): re-download the model folder") from exc


def explain_load_failure(folder: Path, exc: Exception) -> str:
    """transformers' error while loading a folder, said in the user's terms."""
    text = str(exc)
    first = _first_line(exc)
    if "trust_remote_code" in text:
        return (f"backbone folder {folder.name!r} asks to run its own Python code; Omni-Attribute never runs code "
                "from model folders: use the standard Qwen2.5-VL files")
    if "size mismatch" in text or "shape" in text.lower() and "mismatch" in text.lower():
        return (f"backbone folder {folder.name!r}: its weights do not match its config.json (tensors of other sizes "
                "than the config describes): the folder mixes files of different models; re-download it")
    return (f"could not load backbone folder {folder.name!r} as a Qwen2.5-VL model (transformers reports: {first}): "
            "check that the folder is a complete download of a Qwen2.5-VL model")
