"""Building an attribute index: every image embedded under every attribute line (one MLLM prefix pass per image
thanks to the shared image prefix), in batches written as shards, resumable, kept in sync with its folder."""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..images import pil_to_tensor, to_rgb_batch
from .paths import FolderAccessError, ImageFile
from .search import AnnSettings
from .store import (INDEX_FILE, AdapterIdentity, AttributeIndex, AttributeIndexError, _open_shard, _write_shard,
                    attribute_lines, encoder_settings)
from ..prompt import parse_attribute_text

MAX_LOAD_SIDE = 2048   # images are decoded at most this large (the encoder's pixel budget is far smaller)

Progress = Callable[[int, int], None]


def load_image(path: str | os.PathLike, max_side: int = MAX_LOAD_SIDE) -> torch.Tensor:
    """An image file → [1, 3, H, W] RGB in [0, 1] (EXIF rotation applied, huge images reduced)."""
    with Image.open(path) as image:
        image.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced size directly
        image = ImageOps.exif_transpose(image)
        if max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.BICUBIC)
        return pil_to_tensor(image).unsqueeze(0)


def _try_load(path: Path) -> tuple[torch.Tensor | None, str]:
    try:
        return load_image(path), ""
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _prefetch(paths: list[Path], ahead: int = 4) -> Iterable[tuple[torch.Tensor | None, str]]:
    """Decode the next images in a worker thread while the current one is encoded."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending: collections.deque = collections.deque()
        it = iter(paths)
        for path in it:
            pending.append(pool.submit(_try_load, path))
            if len(pending) >= ahead:
                break
        for path in it:
            yield pending.popleft().result()
            pending.append(pool.submit(_try_load, path))
        while pending:
            yield pending.popleft().result()


@torch.no_grad()
def embed_pooled(encoder, image: torch.Tensor, attributes: str | list[str]) -> np.ndarray:
    """One image [1,3,H,W] (or [3,H,W]) under K attribute lines → pooled vectors [K, D] float32 (one prefix pass)."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    sets = parse_attribute_text("\n".join(attributes) if isinstance(attributes, list) else attributes)
    _, pooled = encoder.encode_image(image.to(encoder.compute_device, torch.float32), encoder.instructions_for(sets))
    return pooled.float().cpu().numpy()


@dataclass
class BuildReport:
    added: int = 0
    kept: int = 0
    dropped: int = 0
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    ann: dict = field(default_factory=dict)

    def text(self) -> str:
        parts = [f"{self.added} image(s) embedded", f"{self.kept} kept from before"]
        if self.dropped:
            parts.append(f"{self.dropped} dropped (gone or changed)")
        if self.skipped:
            parts.append(f"{len(self.skipped)} unreadable skipped (e.g. {self.skipped[0]['image']})")
        return ", ".join(parts) + f" in {self.seconds:.1f} s"


_SHARD_NAME = re.compile(r"vectors-(\d+)\.safetensors$")


def _next_shard_number(index: AttributeIndex) -> int:
    numbers = [int(m.group(1)) for s in index.shards if (m := _SHARD_NAME.match(s["file"]))]
    numbers += [int(m.group(1)) for p in index.folder.glob("vectors-*.safetensors") if (m := _SHARD_NAME.match(p.name))]
    return max(numbers, default=-1) + 1


def _compatible(existing: AttributeIndex, adapter: AdapterIdentity, settings: dict, labels: list[str], root: str
                ) -> str | None:
    if existing.adapter.sha256 != adapter.sha256:
        return f"adapter {existing.adapter.describe()} (now {adapter.describe()})"
    if existing.attributes != labels:
        return f"attribute lines {existing.attributes} (now {labels})"
    for key, value in settings.items():
        if existing.encoder.get(key) != value:
            return f"encoder setting {key} = {existing.encoder.get(key)!r} (now {value!r})"
    if os.path.realpath(existing.root) != os.path.realpath(root):
        return f"images from {existing.root} (now {root})"
    return None


def _drop_rows(index: AttributeIndex, keep: set[str]) -> int:
    """Rewrite the shards without the images not in ``keep``; returns how many were dropped."""
    dropped, new_shards, obsolete = 0, [], []
    number = _next_shard_number(index)
    for shard in index.shards:
        array, records = _open_shard(index.folder / shard["file"])
        mask = np.array([r[0] in keep for r in records], dtype=bool)
        if mask.all():
            new_shards.append(shard)
            continue
        dropped += int((~mask).sum())
        obsolete.append(index.folder / shard["file"])
        if mask.any():
            name = f"vectors-{number:06d}.safetensors"
            number += 1
            _write_shard(index.folder / name, np.asarray(array[mask]), [r for r, m in zip(records, mask) if m])
            new_shards.append({"file": name, "images": int(mask.sum())})
        del array
    if dropped:
        index.shards = new_shards
        index.ann = {}
        index.invalidate()
        index.write()
        for path in obsolete:
            path.unlink(missing_ok=True)
    return dropped


def build_index(encoder, images: list[ImageFile], attributes: str | list[str], folder: str | os.PathLike,
                adapter: AdapterIdentity, root: str | os.PathLike, source: dict | None = None, batch_size: int = 64,
                overwrite: bool = False, ann: str = "auto", ann_settings: AnnSettings | None = None,
                on_progress: Progress | None = None, log: Callable[[str], None] | None = None
                ) -> tuple[AttributeIndex, BuildReport]:
    """Embed ``images`` (names relative to ``root``) under the attribute lines into the index at ``folder``.

    An index already there (same adapter, attribute lines, encoder settings and root) is brought up to date:
    images still present and unchanged are kept, new or changed ones embedded, vanished ones dropped. Each batch
    of ``batch_size`` images is written as a shard before the next starts, so a killed build resumes where it
    stopped. ``on_progress(done, total)`` may raise to cancel (finished shards stay)."""
    started = time.time()
    folder = Path(folder)
    labels = attribute_lines(attributes)
    settings = encoder_settings(encoder)
    report = BuildReport()
    existing = None
    if (folder / INDEX_FILE).is_file() and not overwrite:
        existing = AttributeIndex.open(folder)
        difference = _compatible(existing, adapter, settings, labels, str(root))
        if difference:
            raise AttributeIndexError(
                f"{folder} already holds an index built with another {difference}: choose another index "
                "folder/name, or rebuild it from scratch (--overwrite / overwrite on the node)")
    if existing is None:
        if folder.exists() and overwrite:
            for path in list(folder.glob("vectors-*.safetensors")) + list(folder.glob("ann-*.faiss")):
                path.unlink()
        index = AttributeIndex(folder=folder, adapter=adapter, encoder=settings, attributes=labels, root=str(root),
                               source=source or {})
        index.write()
    else:
        index = existing
        index.source = source or index.source
    current = {f.name: f for f in images}
    unchanged = {r[0] for r in index.images if r[0] in current and
                 (current[r[0]].size, current[r[0]].mtime_ns) == (int(r[1]), int(r[2]))}
    report.dropped = _drop_rows(index, unchanged)
    report.kept = len(unchanged)
    known_bad = {s["image"]: s for s in index.skipped
                 if s["image"] in current and (current[s["image"]].size, current[s["image"]].mtime_ns)
                 == (s.get("size"), s.get("mtime_ns"))}
    index.skipped = list(known_bad.values())
    todo = [f for f in images if f.name not in unchanged and f.name not in known_bad]
    if log and existing is not None:
        log(f"[index] resuming {folder}: {len(unchanged)} image(s) already embedded, {len(todo)} to go")
    total = len(todo)
    number = _next_shard_number(index)
    batch_vectors: list[np.ndarray] = []
    batch_records: list[list] = []

    def flush() -> None:
        nonlocal number, batch_vectors, batch_records
        if not batch_vectors:
            return
        name = f"vectors-{number:06d}.safetensors"
        number += 1
        _write_shard(folder / name, np.stack(batch_vectors), batch_records)
        index.shards.append({"file": name, "images": len(batch_records)})
        index.ann = {}
        index.invalidate()
        index.write()
        batch_vectors, batch_records = [], []

    instructions = "\n".join(labels)
    for done, (file, (pixels, problem)) in enumerate(zip(todo, _prefetch([f.path for f in todo])), 1):
        if pixels is None:
            index.skipped.append({"image": file.name, "reason": problem, "size": file.size, "mtime_ns": file.mtime_ns})
            report.skipped.append(index.skipped[-1])
        else:
            batch_vectors.append(embed_pooled(encoder, pixels, instructions).astype(np.float16))
            batch_records.append([file.name, file.size, file.mtime_ns])
            report.added += 1
        if len(batch_records) >= batch_size:
            flush()
        if on_progress:
            on_progress(done, total)
    flush()
    if len(index) == 0:
        reasons = "; ".join(f"{s['image']}: {s['reason']}" for s in index.skipped[:3])
        raise FolderAccessError(f"none of the {len(images)} image file(s) could be read ({reasons}): check that "
                                "they are images (png, jpg, webp, ...) and not damaged")
    index.write()
    wanted = ann if ann != "auto" else None
    have = {e.get("kind") for e in index.ann.values()}
    if report.added or report.dropped or not index.ann or (wanted and have != {wanted}):
        report.ann = index.build_ann(ann, ann_settings)
    else:
        report.ann = index.ann
    report.seconds = time.time() - started
    return index, report


def save_batch_images(images: torch.Tensor, folder: str | os.PathLike) -> list[ImageFile]:
    """A ComfyUI IMAGE batch [B,H,W,C] → PNG files in ``folder`` (named by position and content, so an unchanged
    batch keeps its files and its embeddings); returns them as ImageFiles named relative to folder's parent."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    rgb = to_rgb_batch(images)
    for i in range(rgb.shape[0]):
        array = (rgb[i].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        data = buffer.getvalue()
        path = folder / f"{i:05d}-{hashlib.sha256(data).hexdigest()[:12]}.png"
        if not path.is_file():
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        stat = path.stat()
        files.append(ImageFile(path, f"{folder.name}/{path.name}", stat.st_size, stat.st_mtime_ns))
    return files
