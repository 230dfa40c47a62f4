"""What the tiny world's backbone holds and what its encoders read out of it, without any generation.

    python benchmarks/tiny_world_probes.py [--variant NAME ...] [--adapter LABEL=PATH ...] [--size ci|full|gpu]
                                           [--work DIR] [--device D]

1. The backbone's image states: the frozen MLLM's last hidden states at the image tokens (what every attribute
   text reads) of the world's generator-training images, and a logistic-regression probe of every factor on
   them, scored on the held-out images — on the states' mean, their maximum, and the states in place (all
   tokens side by side). What a read-out of the states *can* find.
2. Each encoder's pooled embeddings of the held-out images under each phrasing of each factor (the three that
   training pairs use and the held-out one that the table's evaluation uses): retrieval precision@10 per factor,
   the selectivity, and the mean cosine between two images' embeddings (near 1: the embedding hardly depends
   on the image, the attribute is not encoded). What the encoders *do* find, and whether a phrasing is why.

The encoders are the table's (both stages, the committed weights in --work; default all four) and any
``--adapter LABEL=PATH`` (an adapter file, e.g. a diagnostic run's). Writes probes.json into --work and prints
the tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's library, whatever the venv points at

import argparse
import json
import time

import torch
from sklearn.linear_model import LogisticRegression

from lab.world.captioner import image_states
from lab.world.evaluate import (
    embed_by_factor,
    mean_cosine_between_images,
    retrieval,
    selectivity,
)
from lab.world.factors import FACTORS, PHRASINGS, Assignment
from lab.world.pairs import read_images
from lab.world.pipeline import (
    CPU,
    SIZES,
    VARIANTS,
    Compute,
    add_compute_arguments,
    compute_from,
    default_work,
    train_world,
)
from omni_attribute.encoder import load_encoder
from omni_attribute.images import load_rgb_batch

POOLINGS = {"mean": lambda s: s.mean(1), "max": lambda s: s.amax(1), "in place": lambda s: s.flatten(1)}


def probe_states(train: torch.Tensor, train_truth: list[Assignment], test: torch.Tensor,
                 test_truth: list[Assignment]) -> dict[str, dict[str, float]]:
    """{pooling: {factor: held-out accuracy of a logistic-regression probe}} on image states [N, tokens, width]."""
    out = {}
    for pooling, pool in POOLINGS.items():
        x_train, x_test = pool(train).numpy(), pool(test).numpy()
        out[pooling] = {}
        for factor, values in FACTORS.items():
            probe = LogisticRegression(max_iter=2000).fit(x_train, [values.index(a[factor]) for a in train_truth])
            out[pooling][factor] = float(probe.score(x_test, [values.index(a[factor]) for a in test_truth]))
    return out


def probe_phrasings(encoder, images: torch.Tensor, truth: list[Assignment]) -> list[dict]:
    """Per phrasing index (the last is held out of training): retrieval per factor, selectivity, mean cosine."""
    rows = []
    for k in range(len(next(iter(PHRASINGS.values())))):
        embeddings = embed_by_factor(encoder, images, {f: PHRASINGS[f][k] for f in FACTORS})
        found = retrieval(embeddings, truth)
        rows.append({"phrasing": k, "held_out": k == len(PHRASINGS["shape"]) - 1,
                     "precision": {f: found[f]["precision"] for f in FACTORS}, "selectivity": selectivity(found),
                     "mean_cosine": mean_cosine_between_images(embeddings)})
    return rows


def probe(size_name: str, work: Path, variants: list[str], adapters: dict[str, Path] | None = None,
          compute: Compute = CPU, log=print) -> dict:
    """The backbone's state probes and, for each table encoder in ``variants`` and each labelled adapter file,
    its probes per phrasing (the world's stages from --work, trained or committed as the pipeline does)."""
    started = time.time()
    models, info = train_world(size_name, work, 0, variants={v: VARIANTS[v] for v in variants}, compute=compute, log=log)
    held_out = read_images(Path(info["held_out"]))
    gen_rows = read_images(Path(info["held_out"]).parents[1] / "gen" / "images.jsonl")
    images, truth = load_rgb_batch([p for p, _, _ in held_out]), [a for _, a, _ in held_out]
    states = probe_states(image_states(models.backbone, load_rgb_batch([p for p, _, _ in gen_rows]), device=compute.device),
                          [a for _, a, _ in gen_rows], image_states(models.backbone, images, device=compute.device), truth)
    report = {"size": size_name, "states": states, "encoders": {}}
    for label, adapter in {**{v: models.adapters[v] for v in variants}, **(adapters or {})}.items():
        report["encoders"][label] = probe_phrasings(load_encoder(models.backbone, adapter, device=compute.device),
                                                    images, truth)
        log(f"[{label}] probed")
    report["seconds"] = round(time.time() - started)
    return report


def _render(report: dict) -> str:
    factors = list(FACTORS)
    lines = ["Backbone image states, logistic-regression probe, held-out accuracy:", "",
             "| read from | " + " | ".join(factors) + " |", "| --- |" + " --- |" * len(factors)]
    lines += [f"| {p} | " + " | ".join(f"{row[f]:.2f}" for f in factors) + " |" for p, row in report["states"].items()]
    lines += ["", "Encoders, per phrasing (P@10 / mean cosine between images):", "",
              "| encoder | phrasing | selectivity | " + " | ".join(factors) + " |",
              "| --- | --- | --- |" + " --- |" * len(factors)]
    for label, rows in report["encoders"].items():
        for row in rows:
            name = " / ".join(PHRASINGS[f][row["phrasing"]] for f in ("shape", "lighting"))
            lines.append(f"| {label} | {row['phrasing']}{' (held out)' if row['held_out'] else ''}: {name}, … | "
                         f"{row['selectivity']:+.3f} | "
                         + " | ".join(f"{row['precision'][f]:.2f} / {row['mean_cosine'][f]:.2f}" for f in factors) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="ci", choices=list(SIZES))
    parser.add_argument("--work", type=Path, default=None, help="the stage cache (default: the size's runs/ folder)")
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), default=None,
                        help="a table encoder to probe (repeatable; default: all four, none when --adapter is given)")
    parser.add_argument("--adapter", action="append", default=[], metavar="LABEL=PATH",
                        help="another adapter file to probe, e.g. a diagnostic run's adapter.safetensors")
    add_compute_arguments(parser)
    args = parser.parse_args(argv)
    compute = compute_from(args, parser)
    extra = {}
    for item in args.adapter:
        label, sep, path = item.partition("=")
        if not sep or not label or not Path(path).is_file():
            parser.error(f"--adapter {item!r}: give LABEL=PATH with PATH an existing adapter file")
        extra[label] = Path(path)
    variants = args.variant if args.variant is not None else ([] if extra else list(VARIANTS))
    work = args.work or default_work(args.size)
    report = probe(args.size, work, variants, extra, compute)
    (work / "probes.json").write_text(json.dumps(report, indent=2))
    print(_render(report))
    print(f"\n{report['seconds']} s; report: {work / 'probes.json'}")


if __name__ == "__main__":
    main()
