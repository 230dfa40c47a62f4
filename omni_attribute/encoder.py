"""The attribute encoder E: Qwen2.5-VL (+ LoRA) reads the image and an instruction, the connector
turns the hidden states into M attribute tokens of width D plus their mean.

Layout of one input: ``[system, user turn start, <vision_start>, image tokens, <vision_end>]``
(the *prefix*, attribute-independent) followed by ``instruction + end of turn`` (the *suffix*).
The connector reads the suffix positions (and, with ``read_image``, the image-token positions, which
come before the instruction and so do not depend on it): one image encoded under K attribute
instructions needs the prefix once: it is run once, its key/value cache is repeated K times and the
K suffixes run as one batch. ``shared_prefix=False`` runs K full passes (the reference path). One
instruction always takes the full pass: there the shared path would only add a second MLLM call and a
key/value cache (on a GPU the second call's kernel launches alone cost about half a pass).

Everything about the token layout (ids, 3D rope positions, where the image tokens sit, suffix lengths,
whether any suffix is padded) is worked out on the host from host tensors, once per image size, so an
encode reads nothing back from the device until its result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import prompt as prompt_lib
from .adapter_file import AdapterMetadata, check_backbone, load_adapter, read_adapter_metadata, save_adapter
from .backbone import (IMAGE_PAD, PREFIX_TEMPLATE, SUFFIX_TEMPLATE, SYSTEM_PROMPT, Backbone, load_backbone,
                       read_backbone_config)
from .connector import Connector
from .embeds import AttributeEmbeds
from .errors import AdapterFileError, AttributeTextError, EmbedsError
from .images import fit_pixels, to_rgb_batch
from .lora import apply_lora, load_lora_state_dict, lora_state_dict

MAX_SUFFIX_TOKENS = 512


@dataclass(frozen=True)
class PrefixLayout:
    """The attribute-independent prefix of one image size, worked out on the host: ids and 3D rope
    positions on the compute device, where the image tokens sit, the first position after the prefix."""
    ids: torch.Tensor          # [1,P]
    positions: torch.Tensor    # [3,1,P]
    image: slice               # the image-token positions in the prefix
    next_position: int         # rope position of the first suffix token


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
        pixel_values, grid, _ = self._prepare_image(rgb)
        return pixel_values, grid.to(self.compute_device), int(grid.prod()) // (self.backbone.merge_size ** 2)

    def _prepare_image(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """(pixel_values on the device, image_grid_thw [1,3] on the host, the same as ints)."""
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
        grid = processed["image_grid_thw"].cpu()
        return processed["pixel_values"].to(self.compute_device, self.dtype), grid, tuple(int(v) for v in grid[0])

    def prefix_layout(self, grid: torch.Tensor) -> PrefixLayout:
        """The prefix for an image of this grid (host ``image_grid_thw``), cached per grid."""
        key = (tuple(int(v) for v in grid[0]), self.compute_device)
        cache = self.__dict__.setdefault("_prefix_layouts", {})
        if key not in cache:
            n_tokens = int(grid.prod()) // (self.backbone.merge_size ** 2)
            text = PREFIX_TEMPLATE.format(system=SYSTEM_PROMPT, image=IMAGE_PAD * n_tokens)
            ids = self.backbone.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            image_id = self.backbone.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
            start = ids[0].tolist().index(image_id)
            positions = self._rope(ids, grid)  # host tensors: transformers' loop never touches the device
            if len(cache) >= 8:
                cache.clear()
            cache[key] = PrefixLayout(ids.to(self.compute_device), positions.to(self.compute_device),
                                      slice(start, start + n_tokens), int(positions.max()) + 1)
        return cache[key]

    def prefix_ids(self, n_image_tokens: int) -> torch.Tensor:
        text = PREFIX_TEMPLATE.format(system=SYSTEM_PROMPT, image=IMAGE_PAD * n_image_tokens)
        ids = self.backbone.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids.to(self.compute_device)

    def suffix_ids(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids [K,L] and mask [K,L] of the instruction suffixes."""
        ids, mask, _ = self.suffix_batch(instructions)
        return ids, mask

    def suffix_batch(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Right-padded token ids [K,L] and mask [K,L] on the device, and each suffix's length (host)."""
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
        return ids.to(self.compute_device), mask.to(self.compute_device), [len(row) for row in rows]

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

    def _layout(self, prefix: torch.Tensor, grid: torch.Tensor) -> PrefixLayout:
        """The layout of a prefix given as device tensors (callers outside encode_image)."""
        positions = self._rope(prefix, grid)
        return PrefixLayout(prefix, positions, self.image_positions(prefix), positions.max() + 1)

    def hidden_shared_prefix(self, pixel_values, grid, prefix, suffix, suffix_mask,
                             layout: PrefixLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix once, its KV cache repeated for the K suffixes: hidden states of the image tokens [1,N,H]
        and of the suffixes [K,L,H]."""
        from transformers.cache_utils import DynamicCache

        k, length = suffix.shape
        p = prefix.shape[1]
        layout = layout or self._layout(prefix, grid)
        prefix_pos = layout.positions
        cache = DynamicCache()
        prefix_out = self.mllm.model(input_ids=prefix, pixel_values=pixel_values, image_grid_thw=grid,
                                     position_ids=prefix_pos, attention_mask=torch.ones_like(prefix),
                                     past_key_values=cache, use_cache=True)
        image_hidden = prefix_out.last_hidden_state[:, layout.image]
        if k > 1:
            cache.batch_repeat_interleave(k)
        start = layout.next_position
        positions = (start + torch.arange(length, device=suffix.device)).view(1, 1, -1).expand(3, k, -1)
        mask = torch.cat([torch.ones(k, p, dtype=suffix_mask.dtype, device=suffix.device), suffix_mask], dim=1)
        out = self.mllm.model(input_ids=suffix, position_ids=positions, attention_mask=mask, past_key_values=cache,
                              use_cache=True, cache_position=torch.arange(p, p + length, device=suffix.device))
        return image_hidden, out.last_hidden_state

    def hidden_full(self, pixel_values, grid, prefix, suffix, suffix_mask, layout: PrefixLayout | None = None,
                    lengths: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference path: one full pass per suffix; same result as hidden_shared_prefix (the image states
        are taken from the first pass). Text after the image continues the rope positions one by one, as
        Qwen2.5-VL's rope index does."""
        p = prefix.shape[1]
        layout = layout or self._layout(prefix, grid)
        rows, image_hidden = [], None
        for i in range(suffix.shape[0]):
            n = lengths[i] if lengths is not None else int(suffix_mask[i].sum())
            ids = torch.cat([prefix, suffix[i:i + 1, :n]], dim=1)
            text = (layout.next_position + torch.arange(n, device=ids.device)).view(1, 1, -1).expand(3, 1, -1)
            out = self.mllm.model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid,
                                  position_ids=torch.cat([layout.positions, text], dim=2),
                                  attention_mask=torch.ones_like(ids), use_cache=False)
            if image_hidden is None:
                image_hidden = out.last_hidden_state[:, layout.image]
            hidden = out.last_hidden_state[:, p:]
            rows.append(torch.nn.functional.pad(hidden, (0, 0, 0, suffix.shape[1] - n)))
        return image_hidden, torch.cat(rows)

    def encode_image(self, rgb: torch.Tensor, instructions: list[str], shared_prefix: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image [1,3,H,W] under K instructions → tokens [K,M,D], pooled [K,D] (differentiable).

        ``shared_prefix``: share the image prefix between the instructions (taken when K > 1; one
        instruction takes the full pass, which is the same computation in one call)."""
        return self.encode_image_via(rgb, instructions, "shared" if shared_prefix and len(instructions) > 1 else "full")

    def encode_image_via(self, rgb: torch.Tensor, instructions: list[str], path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """encode_image on a given path: "shared" (prefix once, also for one instruction) or "full"."""
        if path not in ("shared", "full"):
            raise ValueError(f"path must be 'shared' or 'full', not {path!r}")
        pixel_values, grid_host, (frames, rows, cols) = self._prepare_image(rgb)
        layout = self.prefix_layout(grid_host)
        grid = grid_host.to(self.compute_device)
        suffix, mask, lengths = self.suffix_batch(instructions)
        if path == "shared":
            image_hidden, hidden = self.hidden_shared_prefix(pixel_values, grid, layout.ids, suffix, mask, layout)
        else:
            image_hidden, hidden = self.hidden_full(pixel_values, grid, layout.ids, suffix, mask, layout, lengths)
        image_grid = None
        if self.connector.config.read_image:
            k = hidden.shape[0]
            hidden = torch.cat([image_hidden.expand(k, -1, -1), hidden], dim=1)
            # merged image tokens are in row-major order
            image_grid = (frames * rows // self.backbone.merge_size, cols // self.backbone.merge_size)
        return self.connect(hidden.to(self.dtype), lengths, image_grid)

    def connect(self, hidden: torch.Tensor, lengths: list[int], image_grid: tuple[int, int] | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The connector over [K, (image +) suffix, H] states, the suffixes right-padded to ``lengths``.

        Rows are run in groups of one suffix length with the padding cut off and no key mask: padded
        positions are masked keys, so they change nothing else, and without a mask the connector's
        attention takes its fast kernel (the masked one is about 1.6× slower on a CPU)."""
        before = hidden.shape[1] - max(lengths)  # image positions in front of the suffixes
        groups: dict[int, list[int]] = {}
        for row, length in enumerate(lengths):
            groups.setdefault(length, []).append(row)
        if len(groups) == 1:
            return self.connector(hidden, None, image_grid=image_grid)
        tokens = hidden.new_empty(len(lengths), self.connector.config.num_tokens, self.connector.config.out_dim)
        pooled = hidden.new_empty(len(lengths), self.connector.config.out_dim)
        for length, rows in groups.items():
            index = torch.tensor(rows, device=hidden.device)
            t, p = self.connector(hidden[index, :before + length], None, image_grid=image_grid)
            tokens = tokens.index_copy(0, index, t)
            pooled = pooled.index_copy(0, index, p)
        return tokens, pooled

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
            if not (bool(torch.isfinite(t).all()) and bool(torch.isfinite(p).all())):
                raise EmbedsError(
                    f"the encoder produced NaN or infinite values for image {b} (adapter {self.adapter_name or '?'}, "
                    f"{str(self.dtype).replace('torch.', '')}): its weights overflow at this precision or are damaged. "
                    "Try dtype fp32 (or bf16 instead of fp16); if that does not help, re-export the adapter"
                )
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
                 device: str | torch.device = "cpu", weight_dtype: str = "default",
                 tokenizer_dir: str | Path | None = None) -> AttributeEncoder:
    """Backbone (HF folder, or ComfyUI's Qwen2.5-VL text-encoder file with ``tokenizer_dir``) + adapter file →
    ready encoder. The adapter header is checked against the backbone's config before any weights are read,
    so a mismatch fails fast. ``weight_dtype="fp8_e4m3fn"``: the backbone's Linear weights in float8."""
    name = Path(adapter_path).name
    metadata = read_adapter_metadata(adapter_path)
    check_backbone(metadata, backbone_info_from_config(read_backbone_config(backbone_folder), backbone_folder), name)
    adapter = load_adapter(adapter_path)
    backbone = load_backbone(backbone_folder, dtype=dtype, device=device, weight_dtype=weight_dtype,
                             tokenizer_dir=tokenizer_dir)
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
