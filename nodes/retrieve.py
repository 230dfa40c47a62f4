"""Build Attribute Index · Retrieve by Attribute · Embedding Map.

Folders are named relative to ComfyUI's input folder ("gallery", "faces/2024"), or its output folder with the
suffix " [output]" ("renders [output]"); nothing outside those two folders is read (no '..', no absolute path,
no symlink leading out). Indexes are saved to output/omni_attribute_indexes/<index_name>/ and brought up to date
(not rebuilt) when the node runs again on the same folder.
"""

from __future__ import annotations

import hashlib
import os
import re

import comfy.model_management as mm
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image

from omni_attribute.embedding_map import STYLES, embedding_map, parse_labels, report
from omni_attribute.errors import InputError, OmniAttributeError
from omni_attribute.images import to_rgb_batch
from omni_attribute.prompt import parse_attribute_text
from omni_attribute.retrieval.build import build_index, embed_pooled, load_image, save_batch_images
from omni_attribute.retrieval.paths import FolderAccessError, list_images, resolve_inside
from omni_attribute.retrieval.store import (AdapterIdentity, AttributeIndex, AttributeIndexError, attribute_lines,
                                            encoder_settings, file_sha256)

from . import folders, inputs
from .search import schema
from .sockets import Embeds, Encoder

CATEGORY = "Omni-Attribute"
INDEX_SUBFOLDER = "omni_attribute_indexes"
MAX_K = 64
MAX_TILE = 1024

Index = io.Custom("OMNI_ATTRIBUTE_INDEX")
INDEX = inputs.Socket("OMNI_ATTRIBUTE_INDEX", (AttributeIndex,), "Build Attribute Index")
_ANNOTATION = re.compile(r"^(.*?)\s*\[(input|output)\]\s*$")
_INDEX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")


# ---- folders -------------------------------------------------------------------------------------------

def split_folder(text: str) -> tuple[str, str]:
    """'gallery' → (input dir, 'gallery'); 'renders [output]' → (output dir, 'renders')."""
    match = _ANNOTATION.match(text or "")
    name, which = (match.group(1), match.group(2)) if match else (text or "", "input")
    root = folder_paths.get_output_directory() if which == "output" else folder_paths.get_input_directory()
    return root, name.strip()


def resolve_folder(text: str) -> tuple[str, str]:
    """(allowed root, the folder's real path), or FolderAccessError saying what is wrong."""
    root, name = split_folder(text)
    if not name:
        raise FolderAccessError(f"folder is empty: name a folder inside ComfyUI's input folder ({root}), e.g. "
                                "'gallery', or connect an IMAGE batch")
    path = resolve_inside(root, name, "folder")
    if not os.path.isdir(path):
        what = "a file, not a folder" if os.path.exists(path) else "not there"
        raise FolderAccessError(f"folder {name!r} is {what} in {root}: create it and put the images to index in it")
    return root, str(path)


def folder_problem(folder) -> str | None:
    if folder is None or (isinstance(folder, str) and not folder.strip()):
        return None  # linked, or the IMAGE input is used instead
    if not isinstance(folder, str):
        return f"folder is {folder!r}, not text: name a folder inside ComfyUI's input folder, e.g. 'gallery'"
    try:
        resolve_folder(folder)
    except FolderAccessError as exc:
        return f"folder: {exc}"
    return None


def index_name_problem(name) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not _INDEX_NAME.match(name.strip()):
        return (f"index_name {name!r} is not a plain name: use letters, digits, '.', '_', '-' or spaces (at most 100, "
                "no '/'), e.g. 'faces'")
    return None


def k_problem(k) -> str | None:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        return f"k is {k!r}: give a whole number from 1 to {MAX_K}"
    return None


def attribute_problem(attributes, one_line: bool = False) -> str | None:
    if attributes is None:
        return None
    try:
        sets = parse_attribute_text(attributes)
    except OmniAttributeError as exc:
        return f"attribute{'' if one_line else 's'}: {exc}"
    if one_line and len(sets) != 1:
        return f"attribute: give one attribute line (got {len(sets)}): the index is searched under one attribute"
    return None


def _allowed(path: str) -> bool:
    return any(inputs.inside(path, root) for root in (folder_paths.get_input_directory(),
                                                       folder_paths.get_output_directory()))


# ---- the encoder's adapter file ------------------------------------------------------------------------

def adapter_identity(handle) -> AdapterIdentity:
    """File name + sha256 of the adapter the encoder was loaded from (looked up in models/omni_attribute)."""
    name = handle.encoder.adapter_name
    path = folder_paths.get_full_path(folders.ADAPTERS, name)
    if path is None:
        found = [f for f in folder_paths.get_filename_list(folders.ADAPTERS) if os.path.basename(f) == name]
        paths = {folder_paths.get_full_path(folders.ADAPTERS, f) for f in found} - {None}
        digests = {file_sha256(p) for p in paths}
        if len(digests) != 1:
            raise AttributeIndexError(
                f"cannot tell which adapter file the encoder uses: {len(paths)} files named {name!r} in "
                f"{', '.join(folder_paths.get_folder_paths(folders.ADAPTERS))}; rename them so that each name is unique")
        path = paths.pop()
    return AdapterIdentity(name, file_sha256(path))


def _progress(total: int):
    bar = comfy.utils.ProgressBar(max(1, total))

    def update(done: int, of: int) -> None:
        bar.update_absolute(done, max(1, of))
        mm.throw_exception_if_processing_interrupted()
    return update


# ---- Build Attribute Index -----------------------------------------------------------------------------

class OmniAttributeBuildIndex(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="OmniAttributeBuildIndex",
            display_name="Build Attribute Index",
            category=CATEGORY,
            description=("Builds an index for retrieval (image search, similarity search by attribute): embeds "
                         "every image of a folder (a gallery) or an IMAGE batch under one or more attribute lines "
                         "and saves the index to output/omni_attribute_indexes/<index_name>/. Run again, it only "
                         "embeds what is new or changed."),
            is_output_node=True,
            inputs=[
                Encoder.Input("encoder"),
                io.String.Input("attributes", multiline=True, default="object color",
                                tooltip="one attribute line per search space (commas combine attributes in one line)"),
                io.String.Input("folder", default="",
                                tooltip="a folder in ComfyUI's input folder (e.g. 'gallery'; sub-folders included), "
                                        "or '<name> [output]' for one in the output folder. Leave empty to use "
                                        "the IMAGE input"),
                io.String.Input("index_name", default="attribute_index",
                                tooltip="saved as output/omni_attribute_indexes/<index_name>/"),
                io.Boolean.Input("rebuild", default=False,
                                 tooltip="start over instead of updating the index saved under this name"),
                io.Image.Input("image", optional=True, tooltip="index this IMAGE batch instead of a folder"),
            ],
            outputs=[Index.Output(display_name="index")],
        )

    @classmethod
    def validate_inputs(cls, encoder=None, attributes=None, folder=None, index_name=None, rebuild=None,
                        image=None) -> bool | str:
        return inputs.verdict(inputs.ENCODER.literal_problem("encoder", encoder), attribute_problem(attributes),
                              folder_problem(folder), index_name_problem(index_name),
                              inputs.IMAGE.literal_problem("image", image))

    @classmethod
    def fingerprint_inputs(cls, folder=None, **kwargs):
        """A folder's images may change while the inputs stay the same: fingerprint its listing."""
        if not folder or not isinstance(folder, str) or not folder.strip():
            return ""
        try:
            root, path = resolve_folder(folder)
            listing = list_images(path, root=root)
        except OmniAttributeError:
            return float("nan")  # run, and report the problem
        digest = hashlib.sha256()
        for f in listing:
            digest.update(f"{f.name}\0{f.size}\0{f.mtime_ns}\n".encode())
        return digest.hexdigest()

    @classmethod
    def execute(cls, encoder, attributes: str, folder: str, index_name: str, rebuild: bool,
                image=None) -> io.NodeOutput:
        inputs.ENCODER.require("encoder", encoder)
        inputs.ensure(attribute_problem(attributes), index_name_problem(index_name))
        out = os.path.join(folder_paths.get_output_directory(), INDEX_SUBFOLDER, index_name.strip())
        use_folder = bool(folder and folder.strip())
        if image is not None and use_folder:
            raise InputError(f"both an IMAGE batch and the folder {folder!r} are given: disconnect the image or clear "
                             "the folder")
        if image is None and not use_folder:
            raise InputError("nothing to index: name a folder inside ComfyUI's input folder (e.g. 'gallery') or "
                             "connect an IMAGE batch")
        if image is not None:
            inputs.IMAGE.require("image", image)
            files = save_batch_images(image, os.path.join(out, "images"))
            root, source = out, {"kind": "batch", "images": len(files)}
        else:
            allowed, root = resolve_folder(folder)
            files = list_images(root, root=allowed)
            source = {"kind": "folder", "folder": folder.strip()}
        identity = adapter_identity(encoder)
        encoder.load()
        index, built = build_index(encoder.encoder, files, attributes, out, identity, root, source,
                                   overwrite=bool(rebuild), on_progress=_progress(len(files)))
        text = f"{built.text()}\n{index.summary()}"
        saved = {"folder": os.path.relpath(out, folder_paths.get_output_directory()), "images": len(index),
                 "attributes": index.attributes}
        return io.NodeOutput(index, ui={"text": (text,), "omni_attribute_index": [saved]})


# ---- Retrieve by Attribute -----------------------------------------------------------------------------

def _tiles(paths: list[str]) -> torch.Tensor:
    """Images (all sizes) → one IMAGE batch, each letterboxed into the first one's size (at most 1024 a side)."""
    pictures = []
    for path in paths:
        if not _allowed(path):
            raise FolderAccessError(f"indexed image {path} lies outside ComfyUI's input and output folders: the node "
                                    "only reads those; build the index from a folder inside them")
        try:
            pictures.append(load_image(path, MAX_TILE)[0])
        except OSError as exc:
            raise FolderAccessError(f"indexed image {path} cannot be read any more ({exc}): run Build Attribute "
                                    "Index again to bring the index up to date") from exc
    height, width = pictures[0].shape[1:]
    out = torch.zeros(len(pictures), height, width, 3)
    for i, picture in enumerate(pictures):
        h, w = picture.shape[1:]
        scale = min(height / h, width / w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) != (h, w):
            picture = torch.nn.functional.interpolate(picture[None], size=(nh, nw), mode="bilinear",
                                                      antialias=scale < 1, align_corners=False)[0].clamp(0, 1)
        top, left = (height - nh) // 2, (width - nw) // 2
        out[i, top:top + nh, left:left + nw] = picture.permute(1, 2, 0)
    return out


class OmniAttributeRetrieve(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="OmniAttributeRetrieve",
            display_name="Retrieve by Attribute",
            category=CATEGORY,
            description=("Retrieval (image search) by one attribute: the k similar images in the index, the query "
                         "image's nearest neighbours by cosine similarity of the pooled embeddings. Scores are "
                         "shown on the node."),
            is_output_node=True,
            inputs=[
                Index.Input("index"),
                Encoder.Input("encoder", tooltip="the encoder the index was built with (same adapter file)"),
                io.Image.Input("image", tooltip="the query image(s); a batch gives k hits per image, query by query"),
                io.String.Input("attribute", default="object color", tooltip="one of the index's attribute lines"),
                io.Int.Input("k", default=8, min=1, max=MAX_K),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def validate_inputs(cls, index=None, encoder=None, image=None, attribute=None, k=None) -> bool | str:
        return inputs.verdict(INDEX.literal_problem("index", index), inputs.ENCODER.literal_problem("encoder", encoder),
                              inputs.IMAGE.literal_problem("image", image), attribute_problem(attribute, True),
                              k_problem(k))

    @classmethod
    def execute(cls, index, encoder, image, attribute: str, k: int) -> io.NodeOutput:
        INDEX.require("index", index)
        inputs.ENCODER.require("encoder", encoder)
        inputs.IMAGE.require("image", image)
        inputs.ensure(attribute_problem(attribute, True), k_problem(k))
        index.check_encoder(adapter_identity(encoder), encoder_settings(encoder.encoder))
        index.attribute_position(attribute)  # the attribute is one of the index's, before any work
        encoder.load()
        rgb = to_rgb_batch(image)
        progress = _progress(rgb.shape[0])
        queries = []
        for b in range(rgb.shape[0]):
            queries.append(embed_pooled(encoder.encoder, rgb[b:b + 1], attribute)[0])
            progress(b + 1, rgb.shape[0])
        results = index.search(np.stack(queries), attribute, k)
        hits = [hit for per_query in results for hit in per_query]
        lines = []
        for q, per_query in enumerate(results):
            lines.append(f"query {q} · {per_query[0].attribute if per_query else attribute}:")
            lines += [f"  {h.rank}. {h.score:+.4f}  {h.image}" for h in per_query]
        found = [[{"rank": h.rank, "score": h.score, "image": h.image, "row": h.row} for h in per_query]
                 for per_query in results]
        return io.NodeOutput(_tiles([str(h.path) for h in hits]),
                             ui={"text": ("\n".join(lines),), "omni_attribute_hits": found})


# ---- Embedding Map -------------------------------------------------------------------------------------

def _thumbnails(image: torch.Tensor, side: int = 128) -> list[Image.Image]:
    rgb = to_rgb_batch(image)
    out = []
    for b in range(rgb.shape[0]):
        picture = Image.fromarray((rgb[b].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        picture.thumbnail((side, side))
        out.append(picture)
    return out


def vectors_by_attribute(embeds, count: int, wanted: list[str] | None) -> dict[str, np.ndarray]:
    """Embeds rows → {attribute: [count, D]} in image order; every image must have a row under each attribute."""
    have = list(dict.fromkeys(embeds.attributes))
    chosen = have if not wanted else wanted
    missing = [a for a in chosen if a not in have]
    if missing:
        raise InputError(f"the embeds hold the attribute(s) {have}, not {missing}: change the attributes text "
                         "(or leave it empty to map them all)")
    out = {}
    for attribute in chosen:
        rows = {i: r for r, (a, i) in enumerate(zip(embeds.attributes, embeds.image_index)) if a == attribute}
        if sorted(rows) != list(range(count)):
            raise InputError(f"the embeds have rows for images {sorted(rows)} under {attribute!r}, the IMAGE batch has "
                             f"{count} images: connect the batch the embeds were made from")
        out[attribute] = embeds.pooled[[rows[i] for i in range(count)]].float().numpy()
    return out


class OmniAttributeEmbeddingMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="OmniAttributeEmbeddingMap",
            display_name="Embedding Map",
            category=CATEGORY,
            description=("A t-SNE visualization of the images' embeddings (an embedding plot), one panel per "
                         "attribute line (the paper's figure): the clustering of the same images changes with the "
                         "attribute. With labels, each panel shows how well it separates them (silhouette score)."),
            inputs=[
                io.Image.Input("image", tooltip="the images to map (at least 3)"),
                io.String.Input("attributes", multiline=True, default="object color\nbackground color",
                                tooltip="one panel per line. With embeds: which of their attributes to map (empty: all)"),
                io.Combo.Input("style", options=list(STYLES), default="thumbnails"),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1),
                Encoder.Input("encoder", optional=True, tooltip="embed the images here (or connect embeds)"),
                Embeds.Input("embeds", optional=True, tooltip="embeds of this IMAGE batch made by Encode"),
                io.String.Input("labels", multiline=True, default="", optional=True,
                                tooltip="optional: one label per image (one per line, or comma-separated) to colour "
                                        "the map and score its separation"),
            ],
            outputs=[io.Image.Output(display_name="map")],
        )

    @classmethod
    def validate_inputs(cls, image=None, attributes=None, style=None, seed=None, encoder=None, embeds=None,
                        labels=None) -> bool | str:
        problems = [inputs.IMAGE.literal_problem("image", image), inputs.choice_problem("style", style, STYLES),
                    inputs.ENCODER.literal_problem("encoder", encoder), inputs.EMBEDS.literal_problem("embeds", embeds)]
        if isinstance(seed, bool) or (seed is not None and (not isinstance(seed, int) or not 0 <= seed < 2 ** 31)):
            problems.append(f"seed is {seed!r}: give a whole number from 0 to {2 ** 31 - 1}")
        if isinstance(attributes, str) and attributes.strip():
            problems.append(attribute_problem(attributes))
        return inputs.verdict(*problems)

    @classmethod
    def execute(cls, image, attributes: str, style: str, seed: int, encoder=None, embeds=None,
                labels: str = "") -> io.NodeOutput:
        inputs.IMAGE.require("image", image)
        inputs.ensure(inputs.choice_problem("style", style, STYLES))
        if (encoder is None) == (embeds is None):
            raise InputError("connect either an encoder (to embed the images here) or embeds made from this IMAGE "
                             "batch, not " + ("both" if encoder is not None else "neither"))
        count = image.shape[0] if image.ndim == 4 else 1
        names = parse_labels(labels, count)
        wanted = attribute_lines(attributes) if attributes and attributes.strip() else None
        if embeds is None:
            inputs.ENCODER.require("encoder", encoder)
            if not wanted:
                raise InputError("attributes is empty: write the attribute lines to map, e.g. 'object color'")
            encoder.load()
            embeds = encoder.encoder.encode(image, "\n".join(wanted), on_image_done=_progress(count))
        else:
            inputs.EMBEDS.require("embeds", embeds)
        vectors = vectors_by_attribute(embeds, count, wanted)
        figure, panels = embedding_map(vectors, _thumbnails(image), names, style, seed=seed)
        tensor = torch.from_numpy(np.asarray(figure, dtype=np.float32) / 255.0)[None]
        return io.NodeOutput(tensor, ui={"text": (report(panels),)})
