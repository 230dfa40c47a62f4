"""The tiny attribute world benchmark: train everything on two CPU cores and measure the paper's claims.

    python benchmarks/tiny_world.py [--size full|ci] [--work runs/tiny-world] [--force STAGE]

Stages (each cached under --work, keyed by its settings; a cached stage is reused and says so):
data → judge → generator (trained from scratch, then frozen) → backbone (tiny Qwen2.5-VL, captioning
pre-training) → four encoders trained with omni-attribute-train's trainer on the same generator:
Omni-Attribute (Lgen + Lcon), generative loss only, contrastive loss only, and a holistic encoder
(same backbone, no attribute text, no contrastive loss) → evaluation on held-out images and the
held-out phrasings: attribute retrieval (precision@10 and leakage), personalization (attribute
fidelity, text fidelity, copy-paste), composition with 2 and 3 references. Writes results.json and
results.md into --work.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's library, whatever the venv points at

import argparse
import hashlib
import json
import random
import time

import torch

from omni_attribute.adapter_file import load_adapter
from omni_attribute.encoder import load_encoder
from omni_attribute.ip_adapter import attach_to_diffusers, load_ip_adapter
from omni_attribute.tiny import make_tiny_backbone_folder
from omni_attribute.train.config import load_config
from omni_attribute.train.trainer import train
from omni_attribute.world.backbone import pretrain_captioner
from omni_attribute.world.evaluate import (attribute_tokens, composition_scores, embed_by_factor,
                                           personalization_scores, retrieval)
from omni_attribute.world.factors import FACTORS, caption_without, sample_assignment
from omni_attribute.world.generator import (load_rgb_batch, load_world_generator, sample_composed, sample_images,
                                            train_world_generator)
from omni_attribute.world.judge import accuracy, load_judge, save_judge, train_judge
from omni_attribute.world.pairs import make_images, make_pairs, read_images
from omni_attribute.world.render import render

REPO = Path(__file__).resolve().parent.parent
SIZES = {
    "full": {"gen_images": 6000, "gen_steps": 1500, "gen_batch": 64, "caption_steps": 600, "judge_images": 3000,
             "pairs": 3000, "encoder_steps": 600, "encoder_batch": 8, "eval_images": 300, "eval_cases": 96},
    "ci": {"gen_images": 2000, "gen_steps": 300, "gen_batch": 32, "caption_steps": 200, "judge_images": 1500,
           "pairs": 800, "encoder_steps": 150, "encoder_batch": 8, "eval_images": 160, "eval_cases": 36},
}
VARIANTS = {
    "Omni-Attribute (Lgen + Lcon)": ["loss.lambda_gen=1.0", "loss.lambda_con=0.1"],
    "generative loss only": ["loss.lambda_gen=1.0", "loss.lambda_con=0.0"],
    "contrastive loss only": ["loss.lambda_gen=0.0", "loss.lambda_con=0.1"],
    "holistic encoder": ["loss.lambda_gen=1.0", "loss.lambda_con=0.0", "adapter.prompt_template='Describe the whole image:'"],
}


def stage(work: Path, name: str, settings: dict, force: set[str]) -> tuple[Path, bool]:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    folder = work / f"{name}-{key}"
    done = (folder / "done.json").is_file() and name not in force
    print(f"[{name}] {'cached: reusing ' if done else 'running: '}{folder}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder, done


def mark_done(folder: Path, info: dict) -> None:
    (folder / "done.json").write_text(json.dumps(info, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "tiny-world")
    parser.add_argument("--force", action="append", default=[], help="re-run this stage even if cached")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size, work, force, seed = SIZES[args.size], args.work.resolve(), set(args.force), args.seed
    started = time.time()
    report: dict = {"size": args.size, "seed": seed, "stages": {}}

    data, cached = stage(work, "data", {"size": size, "seed": seed, "v": 2}, force)
    if not cached:
        make_images(data / "gen", size["gen_images"], seed + 1)
        make_images(data / "judge-train", size["judge_images"], seed + 2)
        make_images(data / "held-out", size["eval_images"], seed + 3)
        make_pairs(data / "pairs", size["pairs"], seed + 4)
        mark_done(data, {})
    gen_rows = read_images(data / "gen" / "images.jsonl")
    held_out = read_images(data / "held-out" / "images.jsonl")

    judge_dir, cached = stage(work, "judge", {"data": data.name}, force)
    if not cached:
        rows = read_images(data / "judge-train" / "images.jsonl")
        judge = train_judge(load_rgb_batch([p for p, _, _ in rows]), [a for _, a, _ in rows], epochs=6, seed=seed)
        scores = accuracy(judge, load_rgb_batch([p for p, _, _ in held_out]), [a for _, a, _ in held_out])
        save_judge(judge, judge_dir / "judge.safetensors")
        mark_done(judge_dir, {"held_out_accuracy": scores})
    judge = load_judge(judge_dir / "judge.safetensors")
    report["stages"]["judge"] = json.loads((judge_dir / "done.json").read_text())

    backbone_dir, cached = stage(work, "backbone", {"data": data.name, "steps": size["caption_steps"], "seed": seed}, force)
    if not cached:
        make_tiny_backbone_folder(backbone_dir / "random", seed=seed)
        pretrain_captioner(backbone_dir / "random", backbone_dir / "captioner", load_rgb_batch([p for p, _, _ in gen_rows]),
                           [c for _, _, c in gen_rows], steps=size["caption_steps"], seed=seed)
        mark_done(backbone_dir, {})
    backbone = backbone_dir / "captioner"
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(backbone), fix_mistral_regex=False)

    gen_dir, cached = stage(work, "generator", {"data": data.name, "steps": size["gen_steps"], "batch": size["gen_batch"],
                                                "seed": seed}, force)
    if not cached:
        train_world_generator(load_rgb_batch([p for p, _, _ in gen_rows]), [c for _, _, c in gen_rows], tokenizer,
                              gen_dir / "model", steps=size["gen_steps"], batch_size=size["gen_batch"], seed=seed)
        transformer, text, layout = load_world_generator(gen_dir / "model", tokenizer)
        images = sample_images(transformer, text, layout, [c for _, _, c in held_out[:96]], seed=seed)
        mark_done(gen_dir, {"text_fidelity_of_captions": accuracy(judge, images, [a for _, a, _ in held_out[:96]])})
    report["stages"]["generator"] = json.loads((gen_dir / "done.json").read_text())

    rows = {}
    eval_images = load_rgb_batch([p for p, _, _ in held_out])
    eval_truth = [a for _, a, _ in held_out]
    for name, overrides in VARIANTS.items():
        slug = name.split(" (")[0].replace(" ", "-").lower()
        enc_dir, cached = stage(work, f"encoder-{slug}", {"gen": gen_dir.name, "backbone": backbone_dir.name,
                                                          "steps": size["encoder_steps"], "o": overrides}, force)
        if not cached:
            config = load_config(REPO / "configs" / "train_tiny.yaml", [
                f"output_dir={enc_dir / 'run'}", f"data.pairs={data / 'pairs' / 'pairs.jsonl'}", "data.validation_pairs=null",
                f"backbone.path={backbone}", "generator.kind=world", f"generator.path={gen_dir / 'model'}",
                "generator.guidance=1.0", f"optim.max_steps={size['encoder_steps']}",
                f"optim.batch_size={size['encoder_batch']}", "optim.lr=0.0003", "optim.ip_lr_scale=10",
                "adapter.min_pixels=12544",
                "adapter.max_pixels=12544", "runtime.validate_every=0", "runtime.checkpoint_every=100000",
                "runtime.log_every=25", *overrides])
            train(config, resume=False, progress=False)
            mark_done(enc_dir, {})
        rows[name] = evaluate(enc_dir / "run" / "adapter.safetensors", backbone, gen_dir / "model", tokenizer, judge,
                              eval_images, eval_truth, size["eval_cases"], seed)
        print(f"[{name}] {json.dumps(rows[name]['summary'])}", flush=True)
    report["rows"] = rows
    report["seconds"] = round(time.time() - started)
    (work / "results.json").write_text(json.dumps(report, indent=2))
    table = render_table(report)
    (work / "results.md").write_text(table)
    print(table)


def evaluate(adapter: Path, backbone: Path, generator: Path, tokenizer, judge, images, truth, cases: int, seed: int) -> dict:
    encoder = load_encoder(backbone, adapter)
    retrieval_rows = retrieval(embed_by_factor(encoder, images), truth)
    transformer, text, layout = load_world_generator(generator, tokenizer)
    file = load_adapter(adapter)
    attach_to_diffusers(transformer, load_ip_adapter(file.metadata.generator, file.section("ip_adapter"), adapter.name))
    rng = random.Random(seed + 11)
    factors = list(FACTORS)
    asked = [rng.choice(factors) for _ in range(cases)]
    refs = [sample_assignment(rng) for _ in range(cases)]
    targets = [sample_assignment(rng) for _ in range(cases)]
    ref_images = load_rgb_batch_from_assignments(refs)
    prompts = [caption_without(t, {f}) for t, f in zip(targets, asked)]
    tokens = attribute_tokens(encoder, ref_images, asked)
    personal = personalization_scores(judge.predict(sample_composed(transformer, text, layout, prompts, [tokens], [1.0],
                                                                    seed=seed)), refs, targets, asked)
    baseline = personalization_scores(judge.predict(sample_composed(transformer, text, layout, prompts, [], [],
                                                                    seed=seed)), refs, targets, asked)
    composed = {}
    for n in (2, 3):
        picks = [rng.sample(factors, n) for _ in range(cases)]
        references = [[sample_assignment(rng) for _ in range(n)] for _ in range(cases)]
        target = [sample_assignment(rng) for _ in range(cases)]
        prompt = [caption_without(t, set(fs)) for t, fs in zip(target, picks)]
        token_sets = [attribute_tokens(encoder, load_rgb_batch_from_assignments([r[i] for r in references]),
                                       [p[i] for p in picks]) for i in range(n)]
        judged = judge.predict(sample_composed(transformer, text, layout, prompt, token_sets, [1.0] * n, seed=seed))
        composed[f"{n} references"] = composition_scores(judged, references, picks)
    mean = lambda key: sum(r[key] for r in retrieval_rows.values()) / len(retrieval_rows)  # noqa: E731
    return {"retrieval": retrieval_rows, "personalization": personal, "text_only_baseline": baseline,
            "composition": composed,
            "summary": {"retrieval_precision": mean("precision"), "retrieval_chance": mean("chance"),
                        "leakage": mean("leakage"), "leakage_chance": mean("leakage_chance"), **personal,
                        **{f"composition_{k.split()[0]}": v for k, v in composed.items()}}}


def load_rgb_batch_from_assignments(assignments) -> torch.Tensor:
    import numpy as np

    return torch.stack([torch.from_numpy(np.asarray(render(a), dtype=np.float32) / 255.0).permute(2, 0, 1)
                        for a in assignments])


def render_table(report: dict) -> str:
    lines = [f"Tiny attribute world — size {report['size']}, seed {report['seed']}, {report['seconds']} s", "",
             "| encoder | retrieval P@10 (chance) | leakage (chance) | attribute fidelity | text fidelity | copy-paste | composition 2 / 3 refs |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in report["rows"].items():
        s = row["summary"]
        lines.append(f"| {name} | {s['retrieval_precision']:.3f} ({s['retrieval_chance']:.3f}) | {s['leakage']:.3f} "
                     f"({s['leakage_chance']:.3f}) | {s['attribute_fidelity']:.3f} | {s['text_fidelity']:.3f} | "
                     f"{s['copy_paste']:.3f} | {s['composition_2']:.3f} / {s['composition_3']:.3f} |")
    base = next(iter(report["rows"].values()))["text_only_baseline"]
    lines += ["", f"Text only (no attribute tokens, same prompts): attribute fidelity {base['attribute_fidelity']:.3f}, "
              f"text fidelity {base['text_fidelity']:.3f}, copy-paste {base['copy_paste']:.3f}.",
              f"Judge held-out accuracy: {json.dumps(report['stages']['judge']['held_out_accuracy'])}",
              f"Generator (captions only) read back by the judge: "
              f"{json.dumps(report['stages']['generator']['text_fidelity_of_captions'])}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
