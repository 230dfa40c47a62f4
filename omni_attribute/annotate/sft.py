"""The teacher's answers as supervised conversations for the expert, and Qwen2.5-VL inputs made from them.

``export``: each annotated pair becomes one conversation in Qwen2.5-VL's message format (what qwen-vl-utils,
LLaMA-Factory and ms-swift read as well)::

    {"id": "...", "messages": [
      {"role": "user", "content": [{"type": "image", "image": "imgs/a.png"}, {"type": "image", "image": "imgs/b.png"},
                                   {"type": "text", "text": "<the short expert prompt>"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "{\\"positive_attributes\\": [...], ...}"}]}]}

Image paths are relative to the conversation file's folder. The assistant's text is the teacher's validated
answer without its reasoning: the expert learns to answer directly from the short prompt.

``build_inputs`` renders a conversation with Qwen2.5-VL's chat format (the same rendering a vLLM server
applies to the same messages), with the images resized like the processor would and the loss only on the
answer's tokens (and its end-of-turn token).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .errors import AnnotateError, AnswerRejected
from .images import decode_data_url, fit_size, load_image
from .output import relative_path, scan_jsonl
from .prompts import EXPERT_PROMPT, expert_target, render_chat, validate_answer

IGNORE = -100


# ---- export --------------------------------------------------------------------------------------------

def conversation(record_id: str, image_a: str, image_b: str, answer: str | None) -> dict:
    messages = [{"role": "user", "content": [{"type": "image", "image": image_a}, {"type": "image", "image": image_b},
                                             {"type": "text", "text": EXPERT_PROMPT}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return {"id": record_id, "messages": messages}


def in_validation(record_id: str, fraction: float) -> bool:
    """A fixed split by the id's hash (the same pair is always on the same side)."""
    return fraction > 0 and int(hashlib.sha1(record_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def export_conversations(pair_files: list[str | Path], out: str | Path, validation_fraction: float = 0.0) -> dict:
    """Annotated pairs (the teacher's output) → conversations at ``out`` (and ``out`` with .val before the
    suffix for the validation share). Records whose answer no longer validates are skipped and counted."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    val_path = out.with_name(out.stem + ".val" + out.suffix)
    counts = {"train": 0, "validation": 0, "skipped": 0}
    seen = set()
    lines = {"train": [], "validation": []}
    for pair_file in pair_files:
        pair_file = Path(pair_file)
        if not pair_file.is_file():
            raise AnnotateError(f"annotated pairs file {str(pair_file)!r} does not exist")
        records, _ = scan_jsonl(pair_file, repair=False)
        folder = pair_file.parent
        for record in records:
            rid = str(record.get("id", ""))
            try:
                annotation = validate_answer(record)
                image_a, image_b = record["image_a"], record["image_b"]
            except (AnswerRejected, KeyError):
                counts["skipped"] += 1
                continue
            if not rid or rid in seen:
                counts["skipped"] += 1
                continue
            seen.add(rid)
            paths = [Path(p) if Path(p).is_absolute() else folder / p for p in (image_a, image_b)]
            item = conversation(rid, relative_path(paths[0], out.parent), relative_path(paths[1], out.parent),
                                expert_target(annotation))
            side = "validation" if in_validation(rid, validation_fraction) else "train"
            lines[side].append(json.dumps(item, ensure_ascii=False))
            counts[side] += 1
    if not counts["train"]:
        raise AnnotateError("no usable annotated pair to export: annotate pairs first (omni-attribute-annotate run)")
    out.write_text("\n".join(lines["train"]) + "\n", encoding="utf-8")
    if lines["validation"]:
        val_path.write_text("\n".join(lines["validation"]) + "\n", encoding="utf-8")
    counts["train_file"], counts["validation_file"] = str(out), str(val_path) if lines["validation"] else None
    return counts


# ---- reading -------------------------------------------------------------------------------------------

@dataclass
class Conversation:
    id: str
    messages: list[dict]      # without the assistant's answer; image items hold absolute paths
    answer: str | None
    where: str

    def image_paths(self) -> list[Path]:
        return [Path(item["image"]) for m in self.messages if isinstance(m["content"], list)
                for item in m["content"] if item.get("type") == "image"]


def conversation_files(spec: str | list[str]) -> list[Path]:
    patterns = [spec] if isinstance(spec, str) else list(spec)
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        for match in matches:
            if not Path(match).is_file():
                raise AnnotateError(f"conversation file {match!r} does not exist: write it with omni-attribute-annotate export")
            files.append(Path(match))
    if not files:
        raise AnnotateError(f"no conversation files match {spec!r}")
    return files


def read_conversations(spec: str | list[str]) -> list[Conversation]:
    conversations = []
    for path in conversation_files(spec):
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path.name}:{number}"
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise AnnotateError(f"{where}: not valid JSON ({exc.msg})") from exc
                conversations.append(parse_conversation(data, where, path.parent))
    if not conversations:
        raise AnnotateError(f"no conversations in {spec}")
    return conversations


def parse_conversation(data: object, where: str, base: Path) -> Conversation:
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list) or not data["messages"]:
        raise AnnotateError(f"{where}: a conversation is an object with a non-empty 'messages' list")
    messages = []
    for m in data["messages"]:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or "content" not in m:
            raise AnnotateError(f"{where}: every message needs a role (system, user, assistant) and content")
        content = m["content"]
        if isinstance(content, list):
            items = []
            for item in content:
                if not isinstance(item, dict):
                    raise AnnotateError(f"{where}: content items must be objects ({{'type': 'image'|'text', ...}})")
                if item.get("type") == "image":
                    if not isinstance(item.get("image"), str):
                        raise AnnotateError(f"{where}: an image item needs an 'image' path")
                    p = Path(item["image"].removeprefix("file://"))
                    items.append({"type": "image", "image": str(p if p.is_absolute() else base / p)})
                elif item.get("type") == "text" and isinstance(item.get("text"), str):
                    items.append({"type": "text", "text": item["text"]})
                else:
                    raise AnnotateError(f"{where}: content items are {{'type': 'image', 'image': path}} or "
                                        f"{{'type': 'text', 'text': ...}}, got {str(item)[:80]}")
            content = items
        elif not isinstance(content, str):
            raise AnnotateError(f"{where}: message content must be text or a list of items")
        messages.append({"role": m["role"], "content": content})
    answer = None
    if messages[-1]["role"] == "assistant":
        last = messages.pop()["content"]
        answer = last if isinstance(last, str) else "".join(i.get("text", "") for i in last)
    if not messages or messages[-1]["role"] != "user":
        raise AnnotateError(f"{where}: the conversation must end with a user turn (and the assistant's answer)")
    return Conversation(str(data.get("id", where)), messages, answer, where)


# ---- model inputs --------------------------------------------------------------------------------------

def message_images(messages: list[dict]) -> list[Image.Image]:
    """The images of ``messages`` in order: file paths, or data URLs (an OpenAI request's image_url items)."""
    images = []
    for m in messages:
        if not isinstance(m["content"], list):
            continue
        for item in m["content"]:
            if item.get("type") == "image":
                images.append(load_image(item["image"]))
            elif item.get("type") == "image_url":
                url = item["image_url"]["url"] if isinstance(item.get("image_url"), dict) else item.get("image_url")
                if str(url).startswith("data:"):
                    images.append(Image.open(io.BytesIO(decode_data_url(url))).convert("RGB"))
                else:
                    images.append(load_image(str(url).removeprefix("file://")))
    return images


def build_inputs(backbone, messages: list[dict], answer: str | None, min_pixels: int, max_pixels: int) -> dict:
    """Token ids (and, with an answer, labels that only count the answer), pixel values and image grid."""
    tokenizer = backbone.tokenizer
    images = []
    for image in message_images(messages):
        size = fit_size(image.width, image.height, min_pixels, max_pixels)
        images.append(image.resize(size, Image.BICUBIC) if size != image.size else image)
    merge = backbone.merge_size
    pixel_values, grid, counts = None, None, []
    if images:
        processed = backbone.image_processor(images=images, do_resize=False, return_tensors="pt")
        pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
        counts = [int(row.prod()) // (merge * merge) for row in grid]
    prompt = tokenizer(render_chat(messages, counts, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    out = {"pixel_values": pixel_values, "image_grid_thw": grid, "prompt_length": len(prompt)}
    if answer is None:
        out["input_ids"] = torch.tensor(prompt)
        return out
    target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    out["input_ids"] = torch.tensor(prompt + target)
    out["labels"] = torch.tensor([IGNORE] * len(prompt) + target)
    return out


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-padded batch; images of all samples concatenated in order (what Qwen2.5-VL's forward takes)."""
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n], mask[i, :n] = s["input_ids"], 1
        if "labels" in s:
            labels[i, :n] = s["labels"]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with_images = [s for s in samples if s["pixel_values"] is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([s["pixel_values"] for s in with_images])
        batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in with_images])
    return batch
