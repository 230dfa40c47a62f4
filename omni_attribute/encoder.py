"""The attribute encoder E: Qwen2.5-VL (+ LoRA) reads the image and an instruction, the connector
turns the hidden states into M attribute tokens of width D plus their mean.

Layout of one input: ``[system, user turn start, <vision_start>, image tokens, <vision_end>]``
(the *prefix*, attribute-independent) followed by ``instruction + end of turn`` (the *suffix*).
The connector reads the suffix positions (and, with ``read_image``, the image-token positions, which
come before the instruction and so do not depend on it): one image encoded under K attribute
instructions needs the prefix once: it is run once, its key/value cache is repeated K times and the
K suffixes run as one batch. ``shared_prefix=False`` runs K full passes (the reference path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import prompt as prompt_lib
from .adapter_file import AdapterMetadata, check_backbone, load_adapter, read_adapter_metadata, save_adapter
from .backbone import (IMAGE_PAD, PREFIX_TEMPLATE, SUFFIX_TEMPLATE, SYSTEM_PROMPT, Backbone, load_backbone,
                       read_folder_config)
from .connector import Connector
from .embeds import AttributeEmbeds
from .errors import AdapterFileError, AttributeTextError
from .images import fit_pixels, to_rgb_batch
from .lora import apply_lora, load_lora_state_dict, lora_state_dict

MAX_SUFFIX_TOKENS = 512


class AttributeEncoder(nn.Module):
    def __init__(self, backbone: Backbone, connector: Connector, metadata: AdapterMetadata, adapter_name: str = ""):
        super().__init__()
        self.mllm = backbone.model       # a child module, so .to() and ModelPatcher see its weights
        self.connector = connector
        self.backbone = backbone
        self.metadata = metadata
        self.adapter_name = adapter_name
        tokenizer = backbone.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.convert_tokens_to_ids("<|endoftext|>")

    # Not named `device`: ComfyUI's ModelPatcher writes a plain `device` attribute on the models it manages.
    @property
    def compute_device(self) -> torch.device:
        return self.connector.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.connector.output.weight.dtype

    # ---- inputs -------------------------------------------------------------------------
    def prepare_image(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """[1,3,H,W] in [0,1] → (pixel_values, image_grid_thw [1,3], number of image tokens)."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        image_cfg = self.metadata.image
        factor = self.backbone.patch_factor
        min_px, max_px = int(image_cfg.get("min_pixels", factor * factor)), int(image_cfg.get("max_pixels", 448 * 448))
        rgb = fit_pixels(rgb, min_px, max_px, min_side=factor)
        h, w = smart_resize(rgb.shape[2], rgb.shape[3], factor=factor, min_pixels=min_px, max_pixels=max_px)
        if (h, w) != tuple(rgb.shape[2:]):
            rgb = torch.nn.functional.interpolate(rgb, size=(h, w), mode="bicubic", antialias=True,
                                                  align_corners=False).clamp(0, 1)
        processed = self.backbone.image_processor(images=[rgb[0]], do_resize=False, do_rescale=False, return_tensors="pt")
        grid = processed["image_grid_thw"]
        n_tokens = int(grid.prod().item()) // (self.backbone.merge_size ** 2)
        return processed["pixel_values"].to(self.compute_device, self.dtype), grid.to(self.compute_device), n_tokens

    def prefix_ids(self, n_image_tokens: int) -> torch.Tensor:
        text = PREFIX_TEMPLATE.format(system=SYSTEM_PROMPT, image=IMAGE_PAD * n_image_tokens)
        ids = self.backbone.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids.to(self.compute_device)

    def suffix_ids(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids [K,L] and mask [K,L] of the instruction suffixes."""
        tokenizer = self.backbone.tokenizer
        rows = [tokenizer(SUFFIX_TEMPLATE.format(instruction=text), add_special_tokens=False)["input_ids"]
                for text in instructions]
        longest = max(len(r) for r in rows)
        if longest > MAX_SUFFIX_TOKENS:
            raise AttributeTextError(
                f"an attribute instruction is {longest} tokens long (at most {MAX_SUFFIX_TOKENS}): shorten it"
            )
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return ids.to(self.compute_device), mask.to(self.compute_device)

    def instructions_for(self, attribute_sets: list[list[str]]) -> list[str]:
        return [prompt_lib.format_instruction(names, self.metadata.prompt_template) for names in attribute_sets]

    # ---- MLLM passes --------------------------------------------------------------------
    def _rope(self, input_ids: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        positions, _ = self.mllm.model.get_rope_index(
            input_ids=input_ids, image_grid_thw=grid, attention_mask=torch.ones_like(input_ids))
        return positions

    def image_positions(self, prefix: torch.Tensor) -> torch.Tensor:
        image_id = self.backbone.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        return (prefix[0] == image_id).nonzero().squeeze(1)

    def hidden_shared_prefix(self, pixel_values, grid, prefix, suffix, suffix_mask
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix once, its KV cache repeated for the K suffixes: hidden states of the image tokens [1,N,H]
        and of the suffixes [K,L,H]."""
        from transformers.cache_utils import DynamicCache

        k, length = suffix.shape
        p = prefix.shape[1]
        prefix_pos = self._rope(prefix, grid)
        cache = DynamicCache()
        prefix_out = self.mllm.model(input_ids=prefix, pixel_values=pixel_values, image_grid_thw=grid,
                                     position_ids=prefix_pos, attention_mask=torch.ones_like(prefix),
                                     past_key_values=cache, use_cache=True)
        image_hidden = prefix_out.last_hidden_state[:, self.image_positions(prefix)]
        if k > 1:
            cache.batch_repeat_interleave(k)
        start = prefix_pos.max() + 1
        positions = (start + torch.arange(length, device=suffix.device)).view(1, 1, -1).expand(3, k, -1)
        mask = torch.cat([torch.ones(k, p, dtype=suffix_mask.dtype, device=suffix.device), suffix_mask], dim=1)
        out = self.mllm.model(input_ids=suffix, position_ids=positions, attention_mask=mask, past_key_values=cache,
                              use_cache=True, cache_position=torch.arange(p, p + length, device=suffix.device))
        return image_hidden, out.last_hidden_state

    def hidden_full(self, pixel_values, grid, prefix, suffix, suffix_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference path: one full pass per suffix; same result as hidden_shared_prefix (the image states
        are taken from the first pass)."""
        p = prefix.shape[1]
        rows, image_hidden = [], None
        for i in range(suffix.shape[0]):
            n = int(suffix_mask[i].sum())
            ids = torch.cat([prefix, suffix[i:i + 1, :n]], dim=1)
            out = self.mllm.model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid,
                                  position_ids=self._rope(ids, grid), attention_mask=torch.ones_like(ids),
                                  use_cache=False)
            if image_hidden is None:
                image_hidden = out.last_hidden_state[:, self.image_positions(prefix)]
            hidden = out.last_hidden_state[:, p:]
            rows.append(torch.nn.functional.pad(hidden, (0, 0, 0, suffix.shape[1] - n)))
        return image_hidden, torch.cat(rows)

    def encode_image(self, rgb: torch.Tensor, instructions: list[str], shared_prefix: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image [1,3,H,W] under K instructions → tokens [K,M,D], pooled [K,D] (differentiable)."""
        pixel_values, grid, n_tokens = self.prepare_image(rgb)
        prefix = self.prefix_ids(n_tokens)
        suffix, mask = self.suffix_ids(instructions)
        run = self.hidden_shared_prefix if shared_prefix else self.hidden_full
        image_hidden, hidden = run(pixel_values, grid, prefix, suffix, mask)
        mask = mask.bool()
        image_grid = None
        if self.connector.config.read_image:
            k = hidden.shape[0]
            hidden = torch.cat([image_hidden.expand(k, -1, -1), hidden], dim=1)
            mask = torch.cat([torch.ones(k, image_hidden.shape[1], dtype=torch.bool, device=mask.device), mask], dim=1)
            frames, rows, cols = (int(v) for v in grid[0])  # merged image tokens are in row-major order
            image_grid = (frames * rows // self.backbone.merge_size, cols // self.backbone.merge_size)
        return self.connector(hidden.to(self.dtype), mask, image_grid=image_grid)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, attribute_text: str | list[list[str]], shared_prefix: bool = True,
               on_image_done: Callable[[int, int], None] | None = None) -> AttributeEmbeds:
        """ComfyUI IMAGE [B,H,W,C] × attribute lines → embeds with B*K rows (image-major)."""
        sets = prompt_lib.parse_attribute_text(attribute_text) if isinstance(attribute_text, str) else attribute_text
        instructions = self.instructions_for(sets)
        labels = [prompt_lib.join_attributes(names) for names in sets]
        rgb = to_rgb_batch(images)
        tokens, pooled, attributes, index = [], [], [], []
        for b in range(rgb.shape[0]):
            t, p = self.encode_image(rgb[b:b + 1].to(self.compute_device), instructions, shared_prefix)
            tokens.append(t.float().cpu())
            pooled.append(p.float().cpu())
            attributes += labels
            index += [b] * len(labels)
            if on_image_done:
                on_image_done(b + 1, rgb.shape[0])
        info = {"adapter": self.adapter_name, "backbone": self.metadata.backbone.get("name", ""),
                "generator": self.metadata.generator}
        return AttributeEmbeds(torch.cat(tokens), torch.cat(pooled), attributes, index, info)

    # ---- adapter weights ------------------------------------------------------------------
    def adapter_sections(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"lora": lora_state_dict(self.mllm), "connector": dict(self.connector.state_dict())}

    def save_adapter(self, path: str | Path, ip_adapter: dict[str, torch.Tensor] | None = None) -> None:
        sections = self.adapter_sections()
        if ip_adapter:
            sections["ip_adapter"] = ip_adapter
        save_adapter(path, self.metadata, sections)


def backbone_info_from_config(config: dict, folder: str | Path) -> dict:
    text = config.get("text_config") or {}
    return {
        "family": config.get("model_type"),
        "hidden_size": text.get("hidden_size", config.get("hidden_size")),
        "num_hidden_layers": text.get("num_hidden_layers", config.get("num_hidden_layers")),
        "name": Path(folder).name,
    }


def build_encoder(backbone: Backbone, metadata: AdapterMetadata, adapter_name: str = "new adapter") -> AttributeEncoder:
    """A fresh encoder (LoRA at zero, random connector) for training or for an untrained fixture."""
    apply_lora(backbone.model, metadata.lora)
    connector = Connector(metadata.connector).to(device=backbone.model.device, dtype=backbone.model.dtype)
    return AttributeEncoder(backbone, connector, metadata, adapter_name)


def load_encoder(backbone_folder: str | Path, adapter_path: str | Path, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> AttributeEncoder:
    """Backbone folder + adapter file → ready encoder. The adapter header is checked against the
    backbone's config.json before any weights are read, so a mismatch fails fast."""
    name = Path(adapter_path).name
    metadata = read_adapter_metadata(adapter_path)
    check_backbone(metadata, backbone_info_from_config(read_folder_config(backbone_folder), backbone_folder), name)
    adapter = load_adapter(adapter_path)
    backbone = load_backbone(backbone_folder, dtype=dtype, device=device)
    apply_lora(backbone.model, metadata.lora)
    load_lora_state_dict(backbone.model, adapter.section("lora"), name)
    connector = Connector(metadata.connector)
    result = connector.load_state_dict(adapter.section("connector"), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise AdapterFileError(
            f"{name}: connector weights do not match its own metadata (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}); the file is damaged or hand-edited"
        )
    connector.to(device=device, dtype=dtype).eval()
    return AttributeEncoder(backbone, connector, metadata, name)
