"""omni-attribute-annotate: annotate image pairs with a vision-language model, and distil an expert annotator.

    # 1. which pairs: groups (a sub-folder per subject), nearest neighbours, or your own list
    omni-attribute-annotate pairs --groups photos/ --per-group 20 --out todo.jsonl
    omni-attribute-annotate pairs --neighbours photos/ --embeddings photos.npy -k 5 --out todo.jsonl
    # 2. annotate them with the teacher (any OpenAI-compatible server: vLLM, SGLang, a hosted API)
    omni-attribute-annotate run --pairs todo.jsonl --out data/pairs.jsonl --config configs/annotate_teacher.yaml
    # 3. distil: conversations for the expert, LoRA fine-tuning, then annotate with the expert
    omni-attribute-annotate export --pairs data/pairs.jsonl --out data/expert_sft.jsonl --validation-fraction 0.05
    omni-attribute-annotate finetune --config configs/annotate_expert_finetune.yaml
    omni-attribute-annotate merge --backbone Qwen2.5-VL-32B-Instruct/ --adapter runs/expert/adapter --out runs/expert/merged
    omni-attribute-annotate run --pairs more.jsonl --out data/more_pairs.jsonl --config configs/annotate_expert.yaml
    omni-attribute-annotate compare data/pairs.summary.json data/more_pairs.summary.json

The output of `run` is the trainer's pair format: give it to omni-attribute-train as data.pairs. A killed
`run` resumes where it stopped when started again with the same arguments. Exit status: 0 done, 1 the run
was stopped (server, key, model), 2 bad arguments, configuration or files.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

from ..command_line import run_command
from ..config_files import config_keys, dump_config
from ..errors import OmniAttributeError
from .config import AnnotateConfig, FinetuneConfig, load_annotate_config, load_finetune_config
from .errors import AnnotateError, EndpointError


def _add_config(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--config", required=required, help="YAML or JSON config; paths in it are relative to its folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (parsed as YAML), e.g. endpoint.concurrency=8; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-attribute-annotate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pairs", help="make the list of pairs to annotate",
                       description="Make the list of pairs to annotate (JSONL: id, image_a, image_b).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--list", help="an explicit pair list: JSONL (image_a, image_b[, id]) or CSV")
    source.add_argument("--groups", help="a folder with one sub-folder of images per subject (group)")
    source.add_argument("--group-table", help="a CSV with an image column and a group column")
    source.add_argument("--neighbours", help="a folder of images paired with their nearest neighbours")
    p.add_argument("--image-column", default="image", help="--group-table: the image path column (default image)")
    p.add_argument("--group-column", default="group", help="--group-table: the group column (default group)")
    p.add_argument("--per-group", type=int, default=10, help="groups: pairs drawn per group at most (default 10)")
    p.add_argument("--embeddings", help="neighbours: a .npy [images, dim], one row per image in sorted path order "
                                        "(or in the order of --embedding-paths)")
    p.add_argument("--embedding-paths", help="neighbours: a text file with the image path of each embedding row")
    p.add_argument("--encoder-backbone", help="neighbours: embed with this project's encoder: the Qwen2.5-VL folder")
    p.add_argument("--encoder-adapter", help="neighbours: the encoder's adapter .safetensors")
    p.add_argument("--attribute", default="the whole image",
                   help="neighbours with the encoder: the holistic attribute text (default 'the whole image')")
    p.add_argument("--device", default="cpu", help="neighbours with the encoder: cpu or cuda (default cpu)")
    p.add_argument("-k", "--k", type=int, default=5, help="neighbours per image (default 5)")
    p.add_argument("--min-similarity", type=float, default=-1.0, help="neighbours: leave out pairs below this cosine")
    p.add_argument("--max-similarity", type=float, default=0.98,
                   help="neighbours: leave out pairs at or above this cosine (near-identical; default 0.98)")
    p.add_argument("--index", default="auto", choices=["auto", "flat", "hnsw"],
                   help="neighbour search: exact (flat), approximate FAISS HNSW, or auto (HNSW above 50,000 images)")
    p.add_argument("--near-duplicate-rms", type=float, default=0.01,
                   help="drop pairs of near-identical images (16x16 thumbnails within this RMS difference, 0..1) and "
                        "pairs near-identical to an earlier pair; 0 turns it off (default 0.01)")
    p.add_argument("--max-pairs", type=int, default=0, help="keep a seeded random subset of this many pairs (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the pair list to write (JSONL)")

    p = sub.add_parser("run", help="annotate pairs through a chat-completions endpoint (or locally)",
                       description="Annotate pairs; resumes into an existing output. Config keys:\n"
                                   + "\n".join(config_keys(AnnotateConfig())),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", required=True, help="the pairs to annotate: a JSONL/CSV list (from `pairs`, or your own)")
    p.add_argument("--out", required=True, help="the annotated pairs (JSONL in the trainer's format); appended to")
    _add_config(p, required=False)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="check the pairs, images and endpoint, send nothing")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and stop")

    p = sub.add_parser("export", help="teacher answers → the expert's supervised conversations")
    p.add_argument("--pairs", required=True, nargs="+", help="annotated pairs file(s) written by `run` with the teacher")
    p.add_argument("--out", required=True, help="conversations JSONL (Qwen2.5-VL messages format)")
    p.add_argument("--validation-fraction", type=float, default=0.0,
                   help="share of pairs (by id hash) written to OUT with .val before the suffix (default 0)")

    p = sub.add_parser("finetune", help="LoRA fine-tuning of the expert annotator on exported conversations",
                       description="Fine-tune the expert. Config keys:\n" + "\n".join(config_keys(FinetuneConfig())),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config(p, required=True)
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if output_dir holds a checkpoint")
    p.add_argument("--dry-run", action="store_true", help="check config, conversations and images, then stop")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and stop")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("merge", help="merge the expert's LoRA into a full model folder (for vLLM)")
    p.add_argument("--backbone", required=True, help="the Qwen2.5-VL folder the expert was fine-tuned from")
    p.add_argument("--adapter", required=True, help="the adapter/ folder the fine-tuning wrote")
    p.add_argument("--out", required=True, help="the merged model folder to write")

    p = sub.add_parser("compare", help="teacher vs expert: tokens and latency per pair from two run summaries")
    p.add_argument("teacher", help="the teacher run's <output>.summary.json")
    p.add_argument("expert", help="the expert run's <output>.summary.json")

    p = sub.add_parser("cost", help="prompt tokens per pair and per 1000 pairs for an image size")
    p.add_argument("--tokenizer", required=True, help="a Qwen2.5(-VL) folder with tokenizer files")
    p.add_argument("--width", type=int, default=448, help="image width before resizing (default 448)")
    p.add_argument("--height", type=int, default=448, help="image height before resizing (default 448)")
    _add_config(p, required=False)
    return parser


def command_pairs(args) -> int:
    from . import pairs as P

    if args.list:
        tasks = P.read_pair_list(args.list)
    elif args.groups:
        tasks = P.group_pairs(P.groups_from_folder(args.groups), args.per_group, args.seed, Path(args.groups))
    elif args.group_table:
        tasks = P.group_pairs(P.groups_from_csv(args.group_table, args.image_column, args.group_column), args.per_group,
                              args.seed, Path(args.group_table).parent)
    else:
        root = Path(args.neighbours)
        if args.embedding_paths:
            listing = Path(args.embedding_paths)
            if not listing.is_file():
                raise AnnotateError(f"--embedding-paths {str(listing)!r} does not exist")
            images = [Path(line.strip()) if Path(line.strip()).is_absolute() else root / line.strip()
                      for line in listing.read_text().splitlines() if line.strip()]
        else:
            images = P.list_images(root)
        if args.embeddings:
            vectors = P.load_embeddings(args.embeddings, len(images))
        elif args.encoder_backbone and args.encoder_adapter:
            vectors = P.encoder_embeddings(images, args.encoder_backbone, args.encoder_adapter, args.attribute, args.device)
        else:
            raise AnnotateError("--neighbours needs --embeddings FILE.npy, or --encoder-backbone and --encoder-adapter")
        tasks = P.neighbour_pairs(images, vectors, args.k, args.min_similarity, args.max_similarity, args.index, root)
    before = len(tasks)
    dropped = {}
    if args.near_duplicate_rms > 0:
        tasks, dropped = P.deduplicate(tasks, args.near_duplicate_rms, args.index)
    if args.max_pairs and len(tasks) > args.max_pairs:
        keep = set(random.Random(args.seed).sample(range(len(tasks)), args.max_pairs))
        tasks = [t for i, t in enumerate(tasks) if i in keep]
    P.write_pair_list(tasks, args.out)
    extra = f"; dropped {', '.join(f'{v} ({k})' for k, v in dropped.items())}" if dropped else ""
    print(f"[pairs] {len(tasks)} pairs written to {args.out} (of {before}{extra})")
    return 0


def command_run(args) -> int:
    from .pairs import check_images, read_pair_list
    from .run import annotate, format_summary

    config = load_annotate_config(args.config, args.overrides)
    if args.quiet:
        config.run.progress = False
    if args.print_config:
        print(dump_config(config))
        return 0
    tasks = read_pair_list(args.pairs)
    if args.dry_run:
        import asyncio

        from .run import make_backend

        check_images(tasks)

        async def check() -> list[str]:
            backend = make_backend(config, None)
            try:
                return await backend.check()
            finally:
                await backend.aclose()
        served = asyncio.run(check())
        print(f"[annotate] dry run: {len(tasks)} pairs, images present; endpoint answers"
              + (f" (serves {', '.join(served)})" if served else ""))
        return 0
    summary = annotate(tasks, args.out, config)
    print(format_summary(summary))
    return 0


def command_export(args) -> int:
    from .sft import export_conversations

    if not 0 <= args.validation_fraction < 1:
        raise AnnotateError(f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    counts = export_conversations(args.pairs, args.out, args.validation_fraction)
    print(f"[export] {counts['train']} conversations to {counts['train_file']}"
          + (f", {counts['validation']} to {counts['validation_file']}" if counts["validation"] else "")
          + (f"; {counts['skipped']} records skipped (invalid or repeated)" if counts["skipped"] else ""))
    return 0


def command_finetune(args) -> int:
    from .finetune import finetune, preflight

    config = load_finetune_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(config))
        return 0
    from ..backbone import read_folder_config

    read_folder_config(config.backbone.path)
    conversations = preflight(config)
    print(f"[finetune] {len(conversations)} conversations, backbone {Path(config.backbone.path).name}", flush=True)
    if args.dry_run:
        print("[finetune] dry run: configuration and data are consistent")
        return 0
    path = finetune(config, resume=not args.no_resume, progress=not args.quiet)
    print(f"[finetune] adapter written to {path}")
    return 0


def command_merge(args) -> int:
    from .finetune import merge_adapter

    print(f"[merge] merged model written to {merge_adapter(args.backbone, args.adapter, args.out)}")
    return 0


def command_compare(args) -> int:
    from .run import compare_summaries

    summaries = []
    for path in (args.teacher, args.expert):
        if not Path(path).is_file():
            raise AnnotateError(f"summary {path!r} does not exist: it is written beside a run's output")
        summaries.append(json.loads(Path(path).read_text()))
    print(json.dumps(compare_summaries(*summaries), indent=2))
    return 0


def command_cost(args) -> int:
    from transformers import AutoTokenizer

    from .config import load_annotate_config
    from .images import fit_size
    from .prompts import prompt_tokens

    config = load_annotate_config(args.config, args.overrides)
    if not (Path(args.tokenizer) / "tokenizer_config.json").is_file():
        raise AnnotateError(f"--tokenizer {args.tokenizer!r} is not a folder with Qwen2.5 tokenizer files "
                            "(tokenizer_config.json, vocab.json, merges.txt): give a Qwen2.5-VL model folder")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    width, height = fit_size(args.width, args.height, config.image.min_pixels, config.image.max_pixels)
    rows = {}
    for style in ("teacher", "expert"):
        rows[style] = prompt_tokens(style, tokenizer, width, height)
    print(json.dumps({"image_size_sent": [width, height], "image_tokens_each": (width // 28) * (height // 28),
                      "prompt_tokens_per_pair": rows,
                      "prompt_tokens_per_1000_pairs": {k: v * 1000 for k, v in rows.items()}}, indent=2))
    return 0


COMMANDS = {"pairs": command_pairs, "run": command_run, "export": command_export, "finetune": command_finetune,
            "merge": command_merge, "compare": command_compare, "cost": command_cost}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_command(lambda: COMMANDS[args.command](args),
                       [(EndpointError, 1), ((OmniAttributeError, ValueError, FileNotFoundError), 2)],
                       "interrupted: what was written is kept; run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
