"""The attribute index on disk: a folder with ``index.json`` and safetensors shards of pooled vectors.

    <index>/index.json                  format, adapter identity (file name + sha256), encoder settings,
                                        attribute lines, the image root, shards, skipped files, search indexes
    <index>/vectors-000000.safetensors  tensor ``pooled`` [n, K, D] fp16 (n images × K attribute lines); its
                                        metadata ``omni_attribute_index_shard`` lists the n images
                                        (name relative to the root, size, mtime_ns)
    <index>/ann-<k>.faiss               optional FAISS index of attribute line k
    <index>/images/                     images that came as pixels (an IMAGE batch), saved as PNG

A shard is written atomically and only then listed in index.json (also replaced atomically): a build killed at
any moment leaves a readable index holding every finished shard, and the next build goes on from there.
Vectors are memory-mapped from the shards (the safetensors layout is a JSON header then raw data), so an
index of millions of rows opens instantly and is read only where it is searched.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import OmniAttributeError
from ..prompt import join_attributes, parse_attribute_text
from .search import AnnSettings, ExactSearcher, FaissSearcher, SearchError, pick_kind

FORMAT_NAME = "omni-attribute-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SHARD_KEY = "omni_attribute_index_shard"


class AttributeIndexError(OmniAttributeError):
    """An attribute index is missing, damaged, or does not fit the encoder or the request."""


# ---- adapter identity ------------------------------------------------------------------------------------

_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (cached per path, size and modification time)."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(real, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


@dataclass(frozen=True)
class AdapterIdentity:
    name: str
    sha256: str

    @classmethod
    def of_file(cls, path: str | os.PathLike) -> "AdapterIdentity":
        return cls(Path(path).name, file_sha256(path))

    def describe(self) -> str:
        return f"{self.name} (sha256 {self.sha256[:12]})"

    def to_dict(self) -> dict:
        return {"name": self.name, "sha256": self.sha256}


def encoder_settings(encoder) -> dict:
    """What, besides the adapter file, decides the vectors: backbone, instruction template, pixel budget, width."""
    md = encoder.metadata
    backbone = {k: md.backbone.get(k) for k in ("family", "hidden_size", "num_hidden_layers", "name")}
    return {"backbone": backbone, "prompt_template": md.prompt_template, "image": dict(md.image),
            "width": int(md.connector.out_dim), "dtype": str(encoder.dtype).replace("torch.", "")}


def attribute_lines(text: str | list[str]) -> list[str]:
    """Attribute text (one line per embedding) → the canonical labels the index stores."""
    if isinstance(text, list):
        text = "\n".join(text)
    return [join_attributes(names) for names in parse_attribute_text(text)]


# ---- safetensors shards, memory-mapped ------------------------------------------------------------------

def _write_shard(path: Path, pooled: np.ndarray, images: list[list]) -> None:
    """Write [n, K, D] fp16 vectors and the n image records as one safetensors file, atomically."""
    pooled = np.ascontiguousarray(pooled, dtype=np.float16)
    meta = {SHARD_KEY: json.dumps({"images": images})}
    header = {"__metadata__": meta,
              "pooled": {"dtype": "F16", "shape": list(pooled.shape), "data_offsets": [0, pooled.nbytes]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(struct.pack("<Q", len(raw)))
            handle.write(raw)
            handle.write(pooled.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _open_shard(path: Path) -> tuple[np.ndarray, list[list]]:
    """A shard's vectors as a read-only memmap [n, K, D] fp16 and its image records."""
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(handle.read(size))
        info = header["pooled"]
        meta = json.loads(header["__metadata__"][SHARD_KEY])
        if info["dtype"] != "F16" or len(info["shape"]) != 3:
            raise ValueError(f"unexpected tensor {info['dtype']} {info['shape']}")
        start, end = info["data_offsets"]
        shape = tuple(int(v) for v in info["shape"])
        if end - start != int(np.prod(shape)) * 2 or os.path.getsize(path) < 8 + size + end:
            raise ValueError("the file is shorter than its header says")
        array = np.memmap(path, dtype=np.float16, mode="r", offset=8 + size + start, shape=shape) if shape[0] else \
            np.zeros(shape, np.float16)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise AttributeIndexError(f"index shard {path} is damaged ({exc}): delete the index folder and build it "
                                  "again") from exc
    if len(meta["images"]) != shape[0]:
        raise AttributeIndexError(f"index shard {path} lists {len(meta['images'])} images for {shape[0]} rows: "
                                  "it is damaged; build the index again")
    return array, meta["images"]


class ShardColumn:
    """One attribute line's vectors across all shards, as a VectorSource."""

    def __init__(self, shards: list[np.ndarray], column: int, width: int):
        self.shards = [s for s in shards if len(s)]
        self.column, self.width = column, width
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def gather(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.width), np.float16)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(which):
            pick = which == s
            local = rows[pick] - self.offsets[s]
            order = np.argsort(local)
            block = np.empty((len(local), self.width), np.float16)
            block[order] = self.shards[s][local[order], self.column]
            out[pick] = block
        return out

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        for s, shard in enumerate(self.shards):
            for start in range(0, len(shard), size):
                yield int(self.offsets[s]) + start, np.asarray(shard[start:start + size, self.column])


# ---- the index -----------------------------------------------------------------------------------------

@dataclass
class Hit:
    rank: int
    score: float
    row: int
    image: str          # the image's name relative to the index root
    path: Path          # where it is on disk
    attribute: str

    def to_dict(self) -> dict:
        return {"rank": self.rank, "score": round(self.score, 6), "row": self.row, "image": self.image,
                "path": str(self.path), "attribute": self.attribute}


@dataclass
class AttributeIndex:
    folder: Path
    adapter: AdapterIdentity
    encoder: dict
    attributes: list[str]
    root: str
    source: dict = field(default_factory=dict)
    shards: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    ann: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    _arrays: list[np.ndarray] | None = field(default=None, repr=False)
    _images: list[list] | None = field(default=None, repr=False)
    _searchers: dict = field(default_factory=dict, repr=False)

    # ---- files ----
    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created": self.created,
                "adapter": self.adapter.to_dict(), "encoder": self.encoder, "attributes": self.attributes,
                "root": self.root, "source": self.source, "shards": self.shards, "skipped": self.skipped,
                "ann": self.ann}

    def write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / INDEX_FILE
        fd, tmp = tempfile.mkstemp(prefix=INDEX_FILE + ".", suffix=".tmp", dir=self.folder)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.to_json(), handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "AttributeIndex":
        folder = Path(folder)
        path = folder / INDEX_FILE
        if not path.is_file():
            hint = " (it is a file: give the index folder)" if folder.is_file() else ""
            raise AttributeIndexError(f"{str(folder)!r} is not an attribute index{hint}: no {INDEX_FILE} in it. Build "
                                      "one with 'omni-attribute-index build' or the Build Attribute Index node")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AttributeIndexError(f"{path} is damaged ({exc}): build the index again") from exc
        if data.get("format") != FORMAT_NAME or int(data.get("format_version", 99)) > FORMAT_VERSION:
            raise AttributeIndexError(f"{path}: format {data.get('format')!r} v{data.get('format_version')} is not "
                                      f"one this version reads ({FORMAT_NAME} v{FORMAT_VERSION}); update the plugin")
        return cls(folder=folder, adapter=AdapterIdentity(**data["adapter"]), encoder=data["encoder"],
                   attributes=list(data["attributes"]), root=data["root"], source=data.get("source") or {},
                   shards=list(data.get("shards") or []), skipped=list(data.get("skipped") or []),
                   ann=dict(data.get("ann") or {}), created=float(data.get("created", 0)))

    # ---- contents ----
    def _load(self) -> None:
        if self._arrays is None:
            arrays, images = [], []
            for shard in self.shards:
                array, records = _open_shard(self.folder / shard["file"])
                if array.shape[1:] != (len(self.attributes), self.width):
                    raise AttributeIndexError(
                        f"index shard {shard['file']} holds vectors {list(array.shape)}, expected [n, "
                        f"{len(self.attributes)}, {self.width}]: the index is damaged; build it again")
                arrays.append(array)
                images += records
            self._arrays, self._images = arrays, images

    def invalidate(self) -> None:
        self._arrays, self._images, self._searchers = None, None, {}

    @property
    def width(self) -> int:
        return int(self.encoder["width"])

    @property
    def images(self) -> list[list]:
        """[name, size, mtime_ns] per row."""
        self._load()
        return self._images

    def __len__(self) -> int:
        return sum(int(s["images"]) for s in self.shards)

    def column(self, attribute: str) -> ShardColumn:
        self._load()
        return ShardColumn(self._arrays, self.attribute_position(attribute), self.width)

    def vectors(self, attribute: str) -> np.ndarray:
        """All rows of one attribute as float32 [N, D] (small indexes; large ones are searched in place)."""
        column = self.column(attribute)
        return np.concatenate([c for _, c in column.chunks(65536)]).astype(np.float32) if len(column) else \
            np.zeros((0, self.width), np.float32)

    def attribute_position(self, attribute: str) -> int:
        try:
            (label,) = attribute_lines(attribute)
        except ValueError:
            raise AttributeIndexError(f"ask for one attribute line at a time, got {attribute!r}") from None
        if label not in self.attributes:
            raise AttributeIndexError(
                f"this index holds the attribute(s) {self.attributes} and not {label!r}: query one of those, or build "
                "an index under that attribute")
        return self.attributes.index(label)

    def image_path(self, name: str) -> Path:
        return Path(self.root) / name if not Path(name).is_absolute() else Path(name)

    def row_of(self, image: str) -> int:
        """The row of a stored image, by its name (relative to the root) or its path."""
        names = [r[0] for r in self.images]
        if image in names:
            return names.index(image)
        real = os.path.realpath(image)
        for row, name in enumerate(names):
            if os.path.realpath(self.image_path(name)) == real:
                return row
        near = [n for n in names if Path(n).name == Path(image).name][:3]
        raise AttributeIndexError(f"{image!r} is not an entry of this index" +
                                  (f" (did you mean {', '.join(near)}?)" if near else
                                   f"; entries are named relative to {self.root}, e.g. {names[0] if names else '-'}"))

    # ---- compatibility ----
    def check_encoder(self, adapter: AdapterIdentity, settings: dict | None = None) -> None:
        """Refuse to compare vectors of another adapter (or, given its settings, backbone) with this index's."""
        if adapter.sha256 != self.adapter.sha256:
            same_name = " (same file name, other contents: the adapter was retrained or replaced)" \
                if adapter.name == self.adapter.name else ""
            raise AttributeIndexError(
                f"this index was built with adapter {self.adapter.describe()} but the encoder uses "
                f"{adapter.describe()}{same_name}: embeddings of different adapters cannot be compared. Load "
                f"{self.adapter.name} in the encoder, or build the index again with this adapter")
        for key in ("backbone", "prompt_template", "width") if settings is not None else ():
            if settings.get(key) != self.encoder.get(key):
                raise AttributeIndexError(
                    f"this index was built with {key} {self.encoder.get(key)!r} but the encoder has "
                    f"{settings.get(key)!r}: load the backbone the index was built with, or build it again")

    # ---- search ----
    def searcher(self, attribute: str):
        position = self.attribute_position(attribute)
        if position not in self._searchers:
            column = self.column(attribute)
            entry = self.ann.get(str(position))
            if entry and entry.get("kind") != "exact":
                settings = AnnSettings(**{k: v for k, v in entry["settings"].items() if k in AnnSettings.__dataclass_fields__})
                self._searchers[position] = FaissSearcher.load(column, self.folder / entry["file"], settings)
            else:
                self._searchers[position] = ExactSearcher(column)
        return self._searchers[position]

    def search(self, queries: np.ndarray, attribute: str, k: int = 10, exclude_rows: list[set[int]] | None = None
               ) -> list[list[Hit]]:
        """Top-k stored images per query vector under ``attribute``, by cosine similarity."""
        if len(self) == 0:
            raise AttributeIndexError("this index is empty: build it from a folder that holds images")
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.width:
            raise AttributeIndexError(f"query vectors are {queries.shape[1]} wide, the index {self.width}: embed the "
                                      "query with the encoder the index was built with")
        k = max(1, min(int(k), len(self)))
        label = self.attributes[self.attribute_position(attribute)]
        scores, rows = self.searcher(attribute).search(queries, k, exclude_rows)
        images = self.images
        return [[Hit(rank + 1, float(s), int(r), images[r][0], self.image_path(images[r][0]), label)
                 for rank, (s, r) in enumerate(zip(srow, rrow)) if r >= 0] for srow, rrow in zip(scores, rows)]

    def search_entry(self, image: str, attribute: str, k: int = 10) -> list[Hit]:
        """Top-k under ``attribute`` for a stored image (itself left out)."""
        row = self.row_of(image)
        vector = self.column(attribute).gather(np.array([row]))
        return self.search(vector, attribute, k, exclude_rows=[{row}])[0]

    def build_ann(self, kind: str = "auto", settings: AnnSettings | None = None, progress=None) -> dict:
        """(Re)build the search structure of every attribute line; 'auto' picks exact or ivfpq by size."""
        self.ann = {}
        for position, label in enumerate(self.attributes):
            column = self.column(label)
            chosen = pick_kind(len(column), self.width) if kind == "auto" else kind
            if chosen == "exact":
                self.ann[str(position)] = {"kind": "exact", "attribute": label}
                continue
            base = settings or AnnSettings()
            base = AnnSettings(**{**base.__dict__, "kind": chosen, "extra": {}})
            try:
                searcher = FaissSearcher.build(column, base, progress=progress)
            except SearchError as exc:
                raise AttributeIndexError(f"attribute {label!r}: {exc}") from exc
            name = f"ann-{position}.faiss"
            searcher.save(self.folder / name)
            self.ann[str(position)] = {"kind": chosen, "attribute": label, "file": name,
                                       "settings": searcher.settings.__dict__}
        self._searchers = {}
        self.write()
        return self.ann

    def summary(self) -> str:
        lines = [f"attribute index {self.folder}",
                 f"  {len(self)} images × {len(self.attributes)} attribute line(s), vectors {self.width} wide (fp16)",
                 f"  adapter {self.adapter.describe()}, backbone {self.encoder.get('backbone', {}).get('name')}, "
                 f"dtype {self.encoder.get('dtype')}",
                 f"  root {self.root}"]
        for position, label in enumerate(self.attributes):
            entry = self.ann.get(str(position), {"kind": "exact"})
            lines.append(f"  [{position}] {label}: search {entry['kind']}")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} unreadable file(s), e.g. {self.skipped[0]['image']}: "
                         f"{self.skipped[0]['reason']}")
        return "\n".join(lines)
