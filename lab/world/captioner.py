"""A vision-language prior for the tiny MLLM: the paper starts from a pretrained, instruction-following
Qwen2.5-VL; the tiny world's backbone (random at birth) is first trained on world images to caption them
("Describe the image:" → the caption) and to answer attribute requests ("Describe the <phrasing>:" → that
factor's words), next-token loss on the answer only, then frozen like the real one. Only the training
phrasings are used, so the held-out phrasings stay unseen — also as words: "illumination" and "silhouette"
are unknown to this backbone, unlike to a real MLLM, which costs the encoders lighting (BENCHMARKS.md,
probes). Saved as an HF-format folder.

Captioning alone teaches the random tiny backbone colours and backgrounds (per-pixel statistics) but hardly
shape, pattern or lighting in the steps CI can afford (BENCHMARKS.md, read-back). A real Qwen2.5-VL comes
with that sight from web-scale pre-training; the world stands in for it with an auxiliary loss during
pre-training only: linear read-outs of every factor from the mean of the last hidden states over the image
tokens, trained jointly and then thrown away (``factor_weight``; 0 = captioning alone)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from devtools.fixtures import copy_tokenizer
from omni_attribute.backbone import (
    IMAGE_PAD,
    PREFIX_TEMPLATE,
    SYSTEM_PROMPT,
    load_backbone,
)
from omni_attribute.connector import Connector
from omni_attribute.encoder import AttributeEncoder
from omni_attribute.train.config import AdapterConfig

from .factors import (
    FACTORS,
    HELD_OUT_PHRASINGS,
    TRAIN_PHRASINGS,
    Assignment,
    caption,
    factor_words,
)
from .generator import clipped_step

TURN_END = "<|im_end|>\n<|im_start|>assistant\n"
CAPTION_SHARE = 0.5  # the rest of the samples are attribute requests


class FactorReadout(torch.nn.Module):
    """One linear classifier per factor over the image tokens' mean last hidden state (pre-training only)."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({f: torch.nn.Linear(width, len(v)) for f, v in FACTORS.items()})

    def loss(self, hidden: torch.Tensor, image_positions: torch.Tensor, assignments: list[Assignment]) -> torch.Tensor:
        weights = image_positions.to(hidden.dtype)
        pooled = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
        losses = []
        for factor, head in self.heads.items():
            target = torch.tensor([FACTORS[factor].index(a[factor]) for a in assignments], device=hidden.device)
            losses.append(F.cross_entropy(head(pooled).float(), target))
        return torch.stack(losses).mean()


def caption_or_request(assignment: Assignment, rng: random.Random,
                       phrasings: dict[str, tuple[str, ...]] = TRAIN_PHRASINGS) -> tuple[str, str]:
    """(instruction, answer) for one image: its caption, or one factor named by one of its ``phrasings``."""
    if rng.random() < CAPTION_SHARE:
        return "Describe the image:", caption(assignment)
    factor = rng.choice(list(FACTORS))
    return f"Describe the {rng.choice(phrasings[factor])}:", factor_words(assignment, factor)


def _image_inputs(helper: AttributeEncoder, images: torch.Tensor):
    pixel_values, grids, n_tokens = [], [], 0
    for i in range(images.shape[0]):
        values, grid, n_tokens = helper.prepare_image(images[i:i + 1])
        pixel_values.append(values)
        grids.append(grid)
    return torch.cat(pixel_values), torch.cat(grids), n_tokens


def _answer_batch(tokenizer, n_image_tokens: int, rows: list[tuple[str, str]]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and answer mask of (instruction, answer) rows, each after one image's prefix."""
    image_ids = tokenizer(PREFIX_TEMPLATE.format(system=SYSTEM_PROMPT, image=IMAGE_PAD * n_image_tokens),
                          add_special_tokens=False)["input_ids"]
    sequences, answer_starts = [], []
    for instruction, answer in rows:
        question = image_ids + tokenizer(instruction + TURN_END, add_special_tokens=False)["input_ids"]
        sequences.append(question + tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
        answer_starts.append(len(question))
    longest = max(len(r) for r in sequences)
    ids = torch.full((len(rows), longest), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    for r, row in enumerate(sequences):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
        answer[r, answer_starts[r]:len(row)] = True
    return ids, mask, answer


def _image_helper(backbone, image_pixels: int, device: str | torch.device) -> AttributeEncoder:
    """A throwaway encoder only for its image preparation (the same resizing as the attribute encoder uses);
    it puts the pixels on ``device``."""
    settings = AdapterConfig(num_tokens=1, connector_width=2, connector_layers=1, connector_heads=1,
                             min_pixels=image_pixels, max_pixels=image_pixels)
    metadata = settings.metadata(backbone.info(), out_dim=1)
    return AttributeEncoder(backbone, Connector(metadata.connector).to(device), metadata)


def pretrain_captioner(random_folder: str | Path, out_folder: str | Path, images: torch.Tensor, assignments: list[Assignment],
                       steps: int = 800, batch_size: int = 16, lr: float = 2e-3, seed: int = 0,
                       image_pixels: int = 112 * 112, progress=None, device: str | torch.device = "cpu",
                       factor_weight: float = 0.0, phrasings: dict[str, tuple[str, ...]] = TRAIN_PHRASINGS) -> Path:
    """``phrasings``: the names of each factor its attribute requests use (default: the training phrasings only)."""
    backbone = load_backbone(random_folder)
    model, tokenizer = backbone.model.to(device), backbone.tokenizer
    model.requires_grad_(True).train()
    helper = _image_helper(backbone, image_pixels, device)
    readout = FactorReadout(model.config.text_config.hidden_size).to(device) if factor_weight else None
    parameters = list(model.parameters()) + (list(readout.parameters()) if readout else [])
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    for step in range(steps):
        index = torch.randint(0, images.shape[0], (batch_size,), generator=generator).tolist()
        with torch.no_grad():
            pixel_values, grids, n_tokens = _image_inputs(helper, images[index])
        rows = [caption_or_request(assignments[i], rng, phrasings) for i in index]
        ids, mask, answer = (t.to(device) for t in _answer_batch(tokenizer, n_tokens, rows))
        hidden = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grids).last_hidden_state
        # next-token loss on the answer only (logits only where needed: the vocabulary is 152k wide)
        targets = ids[:, 1:]
        keep = answer[:, 1:]
        logits = model.lm_head(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), targets[keep])
        if readout:
            image_positions = ids == model.config.image_token_id
            loss = loss + factor_weight * readout.loss(hidden, image_positions, [assignments[i] for i in index])
        clipped_step(loss, parameters, optimizer, schedule)
        if progress:
            progress(step + 1, steps, float(loss.detach()))
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    model.config.text_config.name_or_path = ""  # the random folder's path: no machine path in the saved config
    model.cpu().eval().save_pretrained(str(out), safe_serialization=True)
    copy_tokenizer(random_folder, out)
    return out


@torch.no_grad()
def image_states(folder: str | Path, images: torch.Tensor, image_pixels: int = 112 * 112,
                 device: str | torch.device = "cpu", batch_size: int = 32) -> torch.Tensor:
    """The backbone's last hidden states at the image tokens, [N, tokens, width], in the tokens' row-major
    order. They come before any instruction in the causal MLLM, so they are what every attribute text reads."""
    backbone = load_backbone(folder)
    model, tokenizer = backbone.model.to(device).eval(), backbone.tokenizer
    helper = _image_helper(backbone, image_pixels, device)
    rows = []
    for start in range(0, images.shape[0], batch_size):
        pixel_values, grids, n_tokens = _image_inputs(helper, images[start:start + batch_size])
        count = grids.shape[0]
        ids, mask, _ = (t.to(device) for t in _answer_batch(tokenizer, n_tokens, [("Describe the image:", "")] * count))
        hidden = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                             image_grid_thw=grids).last_hidden_state
        rows.append(hidden[:, ids[0] == model.config.image_token_id].float().cpu())
    return torch.cat(rows)


@torch.no_grad()
def read_back(folder: str | Path, images: torch.Tensor, assignments: list[Assignment],
              image_pixels: int = 112 * 112, device: str | torch.device = "cpu", ask: str = "caption"
              ) -> dict[str, float]:
    """What the backbone sees of each factor: the value whose words it finds most likely (the lowest negative
    log-likelihood of the answer among the factor's values, the other factors at their true values) is its
    reading; the share of images read right, per factor. ``ask="caption"``: the answer is the whole caption to "Describe the image:";
    ``ask="held-out phrasing"``: the factor's words to "Describe the <held-out phrasing>:", a phrasing the
    pre-training never saw. An encoder can only carry what its backbone tells apart."""
    if ask not in ("caption", "held-out phrasing"):
        raise ValueError(f"ask={ask!r}: use 'caption' or 'held-out phrasing'")
    backbone = load_backbone(folder)
    model, tokenizer = backbone.model.to(device).eval(), backbone.tokenizer
    helper = _image_helper(backbone, image_pixels, device)
    right = {f: 0 for f in FACTORS}
    for i, truth in enumerate(assignments):
        pixel_values, grids, n_tokens = _image_inputs(helper, images[i:i + 1])
        # every value of every factor in one batch: (factor, value) rows
        candidates = [(f, v) for f, values in FACTORS.items() for v in values]
        variants = [Assignment.of({**truth.as_dict(), f: v}) for f, v in candidates]
        rows = [("Describe the image:", caption(a)) if ask == "caption" else
                (f"Describe the {HELD_OUT_PHRASINGS[f]}:", factor_words(a, f)) for a, (f, _) in zip(variants, candidates)]
        ids, mask, answer = (t.to(device) for t in _answer_batch(tokenizer, n_tokens, rows))
        hidden = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values.repeat(len(rows), 1),
                             image_grid_thw=grids.repeat(len(rows), 1)).last_hidden_state
        keep = answer[:, 1:]
        token_loss = F.cross_entropy(model.lm_head(hidden[:, :-1][keep]).float(), ids[:, 1:][keep], reduction="none")
        loss = torch.zeros(len(rows), device=device).index_add_(0, keep.nonzero()[:, 0], token_loss)  # −log p(answer)
        for factor in FACTORS:
            picks = [r for r, (f, _) in enumerate(candidates) if f == factor]
            best = min(picks, key=lambda r: float(loss[r]))
            right[factor] += candidates[best][1] == truth[factor]
    return {f: right[f] / len(assignments) for f in FACTORS}
