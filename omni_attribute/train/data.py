"""Image pairs annotated with positive (shared) and negative (differing) attributes.

JSONL schema, one pair per line (paths relative to the JSONL file's folder unless absolute):

    {"image_a": "imgs/0001_a.png", "image_b": "imgs/0001_b.png",
     "positive_attributes": ["dog identity", "fur color"],
     "negative_attributes": ["background", "dog pose"],
     "caption_a": "a corgi on a beach", "caption_b": "a corgi on a sofa",
     "source": "optional provenance", "id": "optional unique id",
     "labels": ["dog=corgi", "fur=red"]}

``labels`` (optional) names the shared value of each positive attribute, in the same order. Only the
oracle-token diagnostic (``loss.oracle_tokens``) reads it: it replaces the encoder by a learned token per
label, to measure what the generation path can carry at all.

``positive_attributes`` must not be empty (the generative loss encodes all of them);
``negative_attributes`` may be empty (that pair then adds no contrastive term). Shards: a list of
JSONL files or a glob; every process reads the same ordered stream and keeps the lines whose index
modulo ``world_size`` equals its ``rank`` (deterministic, no coordination needed).

Faults: a malformed line (e.g. a truncated last line) stops an in-memory run before training with a
message naming the file and line; met mid-stream it is skipped and counted like an image that cannot
be read (deleted, cut short, not an image) — the trainer's ``skipped_samples``.
"""

from __future__ import annotations

import glob
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import OmniAttributeError
from ..images import pil_to_tensor

log = logging.getLogger(__name__)
REQUIRED = ("image_a", "image_b", "positive_attributes", "negative_attributes", "caption_a", "caption_b")


class DatasetError(OmniAttributeError):
    """A pair file or record is malformed; the message names the file, line and field."""


@dataclass
class PairRecord:
    image_a: Path
    image_b: Path
    positive_attributes: list[str]
    negative_attributes: list[str]
    caption_a: str
    caption_b: str
    source: str = ""
    id: str = ""
    where: str = ""  # "file:line", for messages
    labels: list[str] = field(default_factory=list)  # the shared value of each positive attribute (optional)


def parse_record(data: object, where: str, base: Path) -> PairRecord:
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: a record must be a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise DatasetError(f"{where}: missing field(s) {', '.join(missing)}")
    for key in ("image_a", "image_b", "caption_a", "caption_b"):
        if not isinstance(data[key], str):
            raise DatasetError(f"{where}: field {key!r} must be a string")
    for key in ("image_a", "image_b"):
        if not data[key].strip():
            raise DatasetError(f"{where}: field {key!r} is empty")
    for key in ("positive_attributes", "negative_attributes"):
        value = data[key]
        if not isinstance(value, list) or not all(isinstance(a, str) and a.strip() for a in value):
            raise DatasetError(f"{where}: field {key!r} must be a list of non-empty strings")
    if not data["positive_attributes"]:
        raise DatasetError(f"{where}: field 'positive_attributes' is empty: a pair needs at least one shared "
                           "attribute (the generative loss encodes all of them)")

    labels = data.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(v, str) and v.strip() for v in labels):
        raise DatasetError(f"{where}: field 'labels' must be a list of non-empty strings")
    if labels and len(labels) != len(data["positive_attributes"]):
        raise DatasetError(f"{where}: field 'labels' has {len(labels)} entries for {len(data['positive_attributes'])} "
                           "positive attributes: give one label per positive attribute, in the same order")

    def resolve(p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else base / path

    return PairRecord(resolve(data["image_a"]), resolve(data["image_b"]),
                      [a.strip() for a in data["positive_attributes"]], [a.strip() for a in data["negative_attributes"]],
                      data["caption_a"], data["caption_b"], str(data.get("source", "")), str(data.get("id", "")), where,
                      [v.strip() for v in labels])


def shard_files(spec: str | list[str]) -> list[Path]:
    patterns = [spec] if isinstance(spec, str) else list(spec)
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise DatasetError(f"pair file {match!r} does not exist")
            files.append(path)
    if not files:
        raise DatasetError(f"no pair files match {spec!r}")
    return files


@dataclass
class MalformedRecord:
    """A line that is not a valid record (e.g. the truncated last line of a file a killed writer left behind),
    kept in the stream in its place: the dataset skips and counts it like an unreadable image, so a streaming run
    goes on and every process keeps the same number of records."""
    where: str
    error: DatasetError


def iter_records(files: list[Path], rank: int = 0, world_size: int = 1,
                 keep_malformed: bool = False) -> Iterator[PairRecord | MalformedRecord]:
    """Records of this process's shard; a malformed line raises DatasetError naming file and line (or, with
    ``keep_malformed``, is yielded as a :class:`MalformedRecord`)."""
    index = 0
    for path in files:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                if index % world_size == rank:
                    where = f"{path.name}:{number}"
                    try:
                        try:
                            data = json.loads(line)
                        except (json.JSONDecodeError, RecursionError) as exc:
                            detail = (f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError)
                                      else "nested too deeply")
                            cut = ("" if line.endswith("\n")
                                   else "; the line ends without a newline: was the file cut short?")
                            raise DatasetError(f"{where}: not valid JSON ({detail}){cut}") from exc
                        record = parse_record(data, where, path.parent)
                    except DatasetError as exc:
                        if not keep_malformed:
                            raise
                        record = MalformedRecord(where, exc)
                    yield record
                index += 1


def check_images_exist(records: list[PairRecord], limit: int = 20) -> None:
    """Fail before any model is loaded when image files are missing (names the first few)."""
    missing = [f"{r.where}: {p}" for r in records for p in (r.image_a, r.image_b) if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - limit} more)" if len(missing) > limit else ""
        raise DatasetError("missing image files:\n  " + "\n  ".join(missing[:limit]) + more)


def load_rgb(path: Path, size: int) -> torch.Tensor:
    """[3,size,size] in [0,1]: center crop to a square, resize."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return pil_to_tensor(image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC))


@dataclass
class PairSample:
    record: PairRecord
    image_a: torch.Tensor
    image_b: torch.Tensor


@dataclass
class SkipCounter:
    skipped: int = 0
    reasons: dict = field(default_factory=dict)

    def add(self, record: PairRecord | MalformedRecord, exc: Exception) -> None:
        self.skipped += 1
        kind = type(exc).__name__
        self.reasons[kind] = self.reasons.get(kind, 0) + 1
        if self.skipped <= 10 or self.skipped % 1000 == 0:
            log.warning("skipping %s (%s: %s); %d skipped so far", record.where, kind, exc, self.skipped)


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset over validated records; an image that fails to decode yields None (counted)."""

    def __init__(self, records: list[PairRecord], image_size: int):
        self.records, self.image_size, self.skips = records, image_size, SkipCounter()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PairSample | None:
        record = self.records[index]
        if isinstance(record, MalformedRecord):  # a bad line met mid-stream
            self.skips.add(record, record.error)
            return None
        try:
            return PairSample(record, load_rgb(record.image_a, self.image_size), load_rgb(record.image_b, self.image_size))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            # OSError covers an image deleted or cut short while the run goes on
            self.skips.add(record, exc)
            return None


def collate(samples: list[PairSample | None]) -> list[PairSample]:
    """Drop the samples that failed to load (the dataset counted them)."""
    return [s for s in samples if s is not None]


def choose_attributes(record: PairRecord, rng: random.Random) -> tuple[str, str | None]:
    """One a+ from the positives and one a− from the negatives (None when there are none)."""
    positive = rng.choice(record.positive_attributes)
    negative = rng.choice(record.negative_attributes) if record.negative_attributes else None
    return positive, negative


def choose_attribute_sets(record: PairRecord, rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    """Up to ``n`` distinct a+ and up to ``n`` distinct a− (none when the record has no negatives); with
    n = 1 the same draw as ``choose_attributes``."""
    if n == 1:
        positive, negative = choose_attributes(record, rng)
        return [positive], [negative] if negative else []
    positives = rng.sample(record.positive_attributes, min(n, len(record.positive_attributes)))
    negatives = rng.sample(record.negative_attributes, min(n, len(record.negative_attributes)))
    return positives, negatives


class StreamingPairs:
    """Pairs read as a stream, never held in memory: for large JSONL shard sets.

    Each pass ("epoch") visits the shard files in a seeded order, keeps this process's lines (index
    modulo world size), and shuffles through a seeded buffer. Everything is determined by the seed and
    the number of records consumed, so a resumed run skips that many and continues identically.
    """

    def __init__(self, files: list[Path], rank: int = 0, world_size: int = 1, seed: int = 0, buffer: int = 1024):
        self.files, self.rank, self.world_size, self.seed, self.buffer = files, rank, world_size, seed, buffer

    def _epoch(self, epoch: int) -> Iterator[PairRecord]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        files = list(self.files)
        rng.shuffle(files)
        pool: list[PairRecord] = []
        for record in iter_records(files, self.rank, self.world_size, keep_malformed=True):
            pool.append(record)
            if len(pool) >= self.buffer:
                yield pool.pop(rng.randrange(len(pool)))
        while pool:
            yield pool.pop(rng.randrange(len(pool)))

    def records(self, consumed: int = 0) -> Iterator[PairRecord]:
        """Endless stream of records, starting after ``consumed`` of them."""
        epoch, produced = 0, 0
        while True:
            empty = True
            for record in self._epoch(epoch):
                empty = False
                if produced >= consumed:
                    yield record
                produced += 1
            if empty:
                raise DatasetError(f"no pairs for process {self.rank} of {self.world_size} in {self.files}")
            epoch += 1
