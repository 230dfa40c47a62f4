"""A vision-language prior for the tiny MLLM: the paper starts from a pretrained Qwen2.5-VL; the tiny
world's backbone (random at birth) is first trained as a captioner of world images (next-token loss on
the caption after the image), then frozen like the real one. Saved as an HF-format folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbone import IMAGE_PAD, PREFIX_TEMPLATE, SYSTEM_PROMPT, load_backbone
from ..connector import Connector, ConnectorConfig
from ..adapter_file import AdapterMetadata
from ..encoder import AttributeEncoder
from ..lora import DEFAULT_TARGETS

INSTRUCTION = "Describe the image:<|im_end|>\n<|im_start|>assistant\n"


def _image_inputs(helper: AttributeEncoder, images: torch.Tensor):
    pixel_values, grids, n_tokens = [], [], 0
    for i in range(images.shape[0]):
        values, grid, n_tokens = helper.prepare_image(images[i:i + 1])
        pixel_values.append(values)
        grids.append(grid)
    return torch.cat(pixel_values), torch.cat(grids), n_tokens


def pretrain_captioner(random_folder: str | Path, out_folder: str | Path, images: torch.Tensor, captions: list[str],
                       steps: int = 800, batch_size: int = 16, lr: float = 2e-3, seed: int = 0,
                       image_pixels: int = 112 * 112, progress=None) -> Path:
    backbone = load_backbone(random_folder)
    model, tokenizer = backbone.model, backbone.tokenizer
    model.requires_grad_(True).train()
    # a throwaway encoder only for its image preparation (same resizing as the attribute encoder uses)
    unused = ConnectorConfig(in_dim=backbone.info()["hidden_size"], out_dim=1, num_tokens=1, width=2, num_layers=1,
                             num_heads=1)
    helper = AttributeEncoder(backbone, Connector(unused), AdapterMetadata(
        backbone=backbone.info(), lora={"target_modules": DEFAULT_TARGETS}, connector=unused,
        prompt_template="", image={"min_pixels": image_pixels, "max_pixels": image_pixels}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        index = torch.randint(0, images.shape[0], (batch_size,), generator=generator).tolist()
        with torch.no_grad():
            pixel_values, grids, n_tokens = _image_inputs(helper, images[index])
        prefix = PREFIX_TEMPLATE.format(system=SYSTEM_PROMPT, image=IMAGE_PAD * n_tokens) + INSTRUCTION
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        rows = [prefix_ids + tokenizer(captions[i] + "<|im_end|>", add_special_tokens=False)["input_ids"] for i in index]
        longest = max(len(r) for r in rows)
        ids = torch.full((batch_size, longest), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        hidden = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grids).last_hidden_state
        # next-token loss on the caption only (logits only where needed: the vocabulary is 152k wide)
        targets = ids[:, 1:]
        keep = mask[:, 1:].bool() & (torch.arange(1, longest)[None] >= len(prefix_ids))
        logits = model.lm_head(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), targets[keep])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress:
            progress(step + 1, steps, float(loss.detach()))
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(str(out), safe_serialization=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(Path(random_folder) / name, out / name)
    return out
