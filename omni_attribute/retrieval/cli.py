"""omni-attribute-index: build, query and inspect attribute indexes.

    omni-attribute-index build --images photos/ --attributes "hairstyle" --attributes "facial expression" \\
        --backbone models/Qwen2.5-VL-7B-Instruct --adapter models/omni_attribute/mine.safetensors --out faces.index
    omni-attribute-index query faces.index --image me.jpg --attribute hairstyle --k 10 \\
        --backbone models/Qwen2.5-VL-7B-Instruct --adapter models/omni_attribute/mine.safetensors
    omni-attribute-index query faces.index --entry 000123.jpg --attribute hairstyle     # no model needed
    omni-attribute-index info faces.index

``--images`` is a folder (searched recursively) or a text file listing image paths. Running ``build`` again on
the same ``--out`` resumes an interrupted build and brings the index up to date with the folder. Exit status:
0 done, 1 the index, the images or the models are not usable (the message says why), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..command_line import run_command
from ..errors import OmniAttributeError
from .paths import FolderAccessError, list_images, read_image_list
from .search import KINDS, AnnSettings

DTYPES = ("fp32", "bf16", "fp16")


def _load_encoder(backbone: str, adapter: str, dtype: str, device: str):
    import torch

    from ..encoder import load_encoder

    if not Path(adapter).is_file():
        raise FolderAccessError(f"adapter file {adapter!r} does not exist: give the .safetensors the trainer wrote")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return load_encoder(backbone, adapter, dtype=torch_dtype, device=device)


def _attributes(values: list[str]) -> str:
    return "\n".join(values)


def cmd_build(args) -> int:
    from tqdm.auto import tqdm

    from .build import build_index
    from .store import AdapterIdentity

    source = Path(args.images)
    if source.is_dir():
        images, root, kind = list_images(source), source.resolve(), "folder"
    elif source.is_file():
        images, root, kind = read_image_list(source), source.resolve().parent, "list"
    else:
        raise FolderAccessError(f"--images {args.images!r} does not exist: give a folder of images or a text file "
                                "listing them")
    print(f"[index] {len(images)} image(s) in {source}; loading the encoder", flush=True)
    encoder = _load_encoder(args.backbone, args.adapter, args.dtype, args.device)
    settings = AnnSettings(nprobe=args.nprobe, rerank=args.rerank, nlist=args.nlist, pca=args.pca)
    bar = tqdm(total=None, unit="image", desc="embedding", disable=args.quiet)

    def progress(done: int, total: int) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.n = done
        bar.refresh()

    index, report = build_index(encoder, images, _attributes(args.attributes), args.out,
                                AdapterIdentity.of_file(args.adapter), root, {"kind": kind, "given": str(source)},
                                batch_size=args.batch, overwrite=args.overwrite, ann=args.ann,
                                ann_settings=settings, on_progress=progress, log=print)
    bar.close()
    print(f"[index] {report.text()}")
    print(index.summary())
    return 0


def cmd_query(args) -> int:
    from .build import embed_pooled, load_image
    from .store import AdapterIdentity, AttributeIndex, encoder_settings

    index = AttributeIndex.open(args.index)
    if args.entry:
        hits = index.search_entry(args.entry, args.attribute, args.k)
        query = f"entry {args.entry}"
    else:
        if not (args.backbone and args.adapter):
            raise FolderAccessError("--image needs the encoder the index was built with: --backbone and --adapter "
                                    f"(this index: adapter {index.adapter.describe()})")
        identity = AdapterIdentity.of_file(args.adapter)
        index.check_encoder(identity)  # before loading any weights
        encoder = _load_encoder(args.backbone, args.adapter, args.dtype, args.device)
        index.check_encoder(identity, encoder_settings(encoder))
        try:
            pixels = load_image(args.image)
        except OSError as exc:
            raise FolderAccessError(f"cannot read the query image {args.image!r} ({exc})") from exc
        hits = index.search(embed_pooled(encoder, pixels, args.attribute), args.attribute, args.k)[0]
        query = f"image {args.image}"
    if args.json:
        print(json.dumps({"query": query, "attribute": args.attribute, "hits": [h.to_dict() for h in hits]}, indent=1))
    else:
        print(f"top {len(hits)} under {args.attribute!r} for {query}:")
        for hit in hits:
            print(f"  {hit.rank:3d}. {hit.score:+.4f}  {hit.image}")
    return 0


def cmd_info(args) -> int:
    from .store import AttributeIndex

    index = AttributeIndex.open(args.index)
    if args.json:
        data = index.to_json()
        data["images"] = len(index)
        print(json.dumps(data, indent=1))
    else:
        print(index.summary())
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omni-attribute-index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def encoder_args(s, required: bool) -> None:
        s.add_argument("--backbone", required=required, help="HF-format Qwen2.5-VL folder")
        s.add_argument("--adapter", required=required, help="Omni-Attribute adapter .safetensors")
        s.add_argument("--dtype", choices=DTYPES, default="fp32", help="(default %(default)s)")
        s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default %(default)s)")

    b = sub.add_parser("build", help="embed images under attribute lines into an index (resumable)")
    b.add_argument("--images", required=True, help="a folder of images (recursive) or a text file listing paths")
    b.add_argument("--attributes", action="append", required=True,
                   help="an attribute line (repeatable; commas combine attributes in one line)")
    b.add_argument("--out", required=True, type=Path, help="the index folder")
    encoder_args(b, True)
    b.add_argument("--batch", type=int, default=64, help="images per shard written (default %(default)s)")
    b.add_argument("--ann", choices=KINDS, default="auto",
                   help="search structure: exact, or FAISS ivfpq / hnsw / ivf; auto = exact below 50k rows of width "
                        "4096, ivfpq above (default %(default)s)")
    b.add_argument("--nprobe", type=int, default=48, help="IVF lists scanned per query (default %(default)s)")
    b.add_argument("--rerank", type=int, default=256, help="ANN candidates re-ranked exactly (default %(default)s)")
    b.add_argument("--nlist", type=int, default=0, help="IVF lists (default: 4·sqrt(rows), a power of 2)")
    b.add_argument("--pca", type=int, default=256, help="reduced width for ivfpq/hnsw (default %(default)s)")
    b.add_argument("--overwrite", action="store_true", help="start over instead of resuming / updating")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(run=cmd_build)

    q = sub.add_parser("query", help="top-k stored images for a query image or a stored entry")
    q.add_argument("index", type=Path)
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("--image", help="a query image file (needs --backbone and --adapter)")
    which.add_argument("--entry", help="a stored image, by its name in the index (no model needed)")
    q.add_argument("--attribute", required=True, help="one of the index's attribute lines")
    q.add_argument("--k", type=int, default=10)
    q.add_argument("--json", action="store_true", help="print JSON")
    encoder_args(q, False)
    q.set_defaults(run=cmd_query)

    i = sub.add_parser("info", help="what an index holds")
    i.add_argument("index", type=Path)
    i.add_argument("--json", action="store_true")
    i.set_defaults(run=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "k", 1) < 1 or getattr(args, "batch", 1) < 1:
        print("error: --k and --batch must be at least 1", file=sys.stderr)
        return 2
    return run_command(lambda: args.run(args), [(OmniAttributeError, 1)],
                       "interrupted: finished shards are kept; run the same build again to go on")


if __name__ == "__main__":
    sys.exit(main())
